"""Closed-form predictor fit: ridge regression per base layer.

With the auxiliary model fixed, the paper's consistency loss in L2 form is a linear
least-squares problem per layer. We accumulate X^T X and X^T Y in float64 over the
calibration tokens (sink positions excluded: the base computes those exactly), choose
the ridge strength per layer and per K/V on a held-out part of the calibration
sequences, then solve once on all of them. No backprop; deterministic; minutes on a CPU.
It is both a training-free predictor and the starting point for end-to-end training.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..config import FitConfig, configure
from ..distributed import current
from ..errors import KvpError
from ..linalg import choose_alpha, ridge_solve, sse
from ..models import arch
from . import shared
from .features import predictor_inputs, true_kv
from .module import KVPredictor, gather, two_sided_sources, window_sources

# Ridge strengths, relative to the mean diagonal of X^T X (scale-free across layers).
ALPHAS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SPLITS = ("fit", "val")


def _rows(t: torch.Tensor, keep: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """[tokens, dim] of the fitted positions. Products per batch run in float32 (fast) and
    are accumulated across batches in float64."""
    x = t[keep].float()
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1) if bias else x


class RidgeStats:
    """Moments per split: X^T X per distinct input (a tuple of aux sources), X^T Y and Y^T Y
    per (K or V, base layer). A bias column is appended to X."""

    def __init__(self, predictor: KVPredictor):
        self.p = predictor
        self.xtx: dict[tuple, torch.Tensor] = {}
        self.xty: dict[tuple, torch.Tensor] = {}
        self.yty: dict[tuple, torch.Tensor] = {}
        self.tokens = dict.fromkeys(SPLITS, 0)

    def input_key(self, kind: str, i: int) -> tuple:
        # In hidden mode K and V read the same input, so they share one X^T X.
        return (kind if self.p.input_mode == "kv" else "x", *self.p.sources[i])

    @staticmethod
    def _acc(store: dict, key: tuple, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    def add(self, split: str, xk: list, xv: list, yk: list, yv: list, keep: torch.Tensor) -> None:
        self.tokens[split] += int(keep.sum())
        inputs: dict[tuple, torch.Tensor] = {}
        for i in range(self.p.n_base_layers):
            for kind, xs, ys in (("k", xk, yk), ("v", xv, yv)):
                ikey = self.input_key(kind, i)
                if ikey not in inputs:
                    inputs[ikey] = x = _rows(gather(xs, self.p.sources[i]), keep, bias=True)
                    self._acc(self.xtx, (split, *ikey), (x.T @ x).double())
                x, y = inputs[ikey], _rows(ys[i], keep)
                self._acc(self.xty, (split, kind, i), (x.T @ y).double())
                self._acc(self.yty, (split, kind, i), (y.double() ** 2).sum())

    def allreduce(self) -> None:
        """Sum the statistics across ranks (torch.distributed), so the fit scales out."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for store in (self.xtx, self.xty, self.yty):
            for key in sorted(store, key=str):  # the same order on every rank
                dist.all_reduce(store[key])
        counts = torch.tensor([self.tokens[s] for s in SPLITS])
        dist.all_reduce(counts)
        self.tokens = dict(zip(SPLITS, counts.tolist()))

    def moments(self, split: str, kind: str, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (self.xtx[(split, *self.input_key(kind, i))], self.xty[(split, kind, i)],
                float(self.yty[(split, kind, i)]))


@torch.no_grad()
def collect(base, aux, seqs: torch.Tensor, predictor: KVPredictor, sink_len: int, batch: int = 4,
            val_every: int = 8, progress: bool = True, base_kv: tuple[list, list] | None = None,
            aux_inputs: list | None = None) -> RidgeStats:
    """Run base and aux over the calibration sequences and accumulate the statistics.

    Every `val_every`-th sequence goes to the validation split used to pick the ridge strength.
    Under torchrun each process takes every world.size-th sequence of each split (the sums
    are reduced across processes afterwards, RidgeStats.allreduce), so any count works.
    `base_kv` / `aux_inputs`: the same activations already computed for all of `seqs` (per layer
    [N, S, dim]; see shared.py); the corresponding forward pass is then skipped.
    """
    world = current()
    stats = RidgeStats(predictor)
    keep = torch.zeros(seqs.shape[1], dtype=torch.bool)
    keep[sink_len:] = True
    idx = torch.arange(len(seqs))
    splits = [("fit", idx[idx % val_every != val_every - 1]), ("val", idx[idx % val_every == val_every - 1])]
    splits = [(split, sel[world.rank :: world.size]) for split, sel in splits]
    bar = tqdm(total=sum(len(sel) for _, sel in splits), desc="fit: base+aux activations", unit="seq",
               disable=not progress)
    for split, sel in splits:
        mask = keep.expand(batch, -1)
        if not len(sel) and world.distributed:
            # no sequence of this split here: one with nothing kept adds zero statistics of the
            # right shapes, so every rank's all-reduce stays in step
            sel, mask = sel.new_zeros(1), torch.zeros(1, seqs.shape[1], dtype=torch.bool)
        for s in range(0, len(sel), batch):
            rows = sel[s : s + batch]
            ids = seqs[rows]
            if base_kv is not None:
                yk, yv = [t[rows] for t in base_kv[0]], [t[rows] for t in base_kv[1]]
            else:
                yk, yv = true_kv(base, input_ids=ids)
            if aux_inputs is not None:
                xk = xv = [t[rows] for t in aux_inputs]
            else:
                xk, xv = predictor_inputs(aux, predictor.input_mode, input_ids=ids)
            stats.add(split, xk, xv, yk, yv, mask[: len(ids)])
            bar.update(len(ids))
    bar.close()
    return stats


def reduce_rank(ws: list[torch.Tensor], xtx: torch.Tensor, rank: int) -> tuple[torch.Tensor, list, list]:
    """Reduced-rank ridge: the full maps `ws` (per output, [in + 1, out], bias row last) that read one
    input, restricted to one shared r-dimensional subspace of their fitted values.

    The fitted values X W (centred; each output scaled to unit norm, so K and V count by relative
    error) are projected onto their top-r principal directions V: W -> W V V^T, the best rank-r map
    in that metric given the ridge solution; the bias keeps the fitted mean. Returns (down [r, in],
    per output (weight [out, r], bias [out]), per output the equivalent full map [in + 1, out])."""
    n = xtx[-1, -1]
    mu = xtx[:-1, -1] / n
    cov = xtx[:-1, :-1] / n - torch.outer(mu, mu)
    w1s = [w[:-1] for w in ws]
    scales = [float((w1 * (cov @ w1)).sum()) ** 0.5 or 1.0 for w1 in w1s]
    wc = torch.cat([w1 / s for w1, s in zip(w1s, scales)], dim=1)
    _, vecs = torch.linalg.eigh(wc.T @ cov @ wc)  # ascending
    v = vecs[:, -rank:]
    a = wc @ v  # [in, r]
    outs, full, off = [], [], 0
    for w, w1, s in zip(ws, w1s, scales):
        b = v[off : off + w.shape[1]].T * s  # [r, out]
        off += w.shape[1]
        bias = w[-1] + mu @ (w1 - a @ b)
        outs.append((b.T, bias))
        full.append(torch.cat([a @ b, bias[None]]))
    return a.T, outs, full


@torch.no_grad()
def solve(stats: RidgeStats, alphas: tuple[float, ...] = ALPHAS) -> dict:
    """Choose alpha per base layer and K/V among `alphas` on the validation split, then solve on
    fit+val (in place). A reduced-rank predictor is the full solution at the chosen alphas reduced
    by `reduce_rank` (its validation error: reduced from the fit split's solution)."""
    p = stats.p
    if not stats.tokens["val"]:
        raise KvpError("too few calibration sequences to hold some out for choosing the ridge strength")
    report: dict = {"alpha_k": [], "alpha_v": [], "val_rel_err_k": [], "val_rel_err_v": []}
    for i in range(p.n_base_layers):
        kinds = (("k", p.k[i], p.mean_k[i]), ("v", p.v[i], p.mean_v[i]))
        fits, vals, w_fit, w_all = [], [], [], []
        for kind, _lin, mean in kinds:
            fit, val = stats.moments("fit", kind, i), stats.moments("val", kind, i)
            alpha, _err = choose_alpha(fit, val, alphas, unpenalized=1)
            xtx, xty = fit[0] + val[0], fit[1] + val[1]
            w_fit.append(ridge_solve(fit[0], fit[1], alpha, unpenalized=1))
            w_all.append(ridge_solve(xtx, xty, alpha, unpenalized=1))
            mean.copy_((xty[-1] / xtx[-1, -1]).float())  # bias column: sum(Y) / count
            fits.append(fit)
            vals.append(val)
            report[f"alpha_{kind}"].append(alpha)
        if p.rank:  # K and V read one input here (hidden mode)
            w_fit = reduce_rank(w_fit, fits[0][0], p.rank)[2]
            xtx = fits[0][0] + vals[0][0]
            down, outs, _ = reduce_rank(w_all, xtx, p.rank)
            p.down[i].weight.copy_(down.float())
        else:
            outs = [(w[:-1].T, w[-1]) for w in w_all]
        for (kind, lin, _mean), (weight, bias), w, val in zip(kinds, outs, w_fit, vals):
            lin.weight.copy_(weight.float())
            lin.bias.copy_(bias.float())
            err = sse(w, *val)
            report[f"val_rel_err_{kind}"].append(math.sqrt(max(err, 0.0) / max(val[2], 1e-30)))
    report["tokens_fit"], report["tokens_val"] = stats.tokens["fit"], stats.tokens["val"]
    return report


def new_predictor(base, aux, layer_map: list[int], input_mode: str = "hidden",
                  kept: list[int] | None = None, window: int = 0, rank: int | None = None) -> KVPredictor:
    """An unfitted predictor of the right shape. With `kept` (LP aux, hidden input), base layers
    the aux skipped read two aux layers (see module.two_sided_sources); with `window` > 0 every
    base layer reads the aux layers within that distance (module.window_sources)."""
    sa, sb = arch.ArchSpec.of(aux), arch.ArchSpec.of(base)
    if len(layer_map) != sb.n_layers or max(layer_map) >= sa.n_layers:
        raise KvpError(f"layer map of {len(layer_map)} entries does not fit base {sb.n_layers} / aux {sa.n_layers} layers")
    sources = None
    if window > 0 and input_mode == "hidden":
        sources = window_sources(layer_map, sa.n_layers, window)
    elif kept is not None and input_mode == "hidden":
        sources = two_sided_sources(layer_map, [i in kept for i in range(sb.n_layers)], sa.n_layers)
    in_dim = sa.hidden if input_mode == "hidden" else sa.kv_dim
    return KVPredictor(layer_map, input_mode, in_dim, in_dim, sb.kv_dim, sources, rank)


def fit_ridge(base, aux, seqs, layer_map, config: FitConfig | None = None, *, kept: list[int] | None = None,
              progress: bool = True, **options) -> tuple[KVPredictor, dict]:
    """Fit a predictor in closed form as `config` (or `options`, its fields by name) says. Returns
    (predictor, fit report). `kept`: the base layers a layer-pruned aux kept, which sources
    "two-sided" reads around (without them a base layer reads one aux layer, as "paper"). `alpha`
    fixes the ridge strength (the report still gives its validation error); None chooses it among
    ALPHAS. `rank` factorises each base layer's K and V maps through one shared r-dimensional
    input (reduce_rank).

    Activations that derive left for these models and sequences in this process (shared.py) are
    used instead of running the models again."""
    (cfg,) = configure(options, (FitConfig, config))
    input_mode, sink_len = cfg.input, cfg.sink
    if seqs.shape[1] <= sink_len + 1:
        raise KvpError(f"calibration sequences of {seqs.shape[1]} tokens leave nothing to fit after a sink of {sink_len}")
    pred = new_predictor(base, aux, layer_map, input_mode, kept if cfg.sources == "two-sided" else None,
                         1 if cfg.sources == "window" else 0, cfg.rank)
    base_kv = aux_inputs = None
    if shared.pending():
        tokens = shared.digest(seqs)
        base_kv = shared.take("base_kv", (shared.digest(base), tokens))
        if input_mode == "hidden":
            aux_inputs = shared.take("aux_hidden", (shared.digest(aux), tokens))
        shared.clear()  # whatever was not taken is for other models or sequences
    stats = collect(base, aux, seqs, pred, sink_len, progress=progress, base_kv=base_kv, aux_inputs=aux_inputs)
    stats.allreduce()
    report = solve(stats, ALPHAS if cfg.alpha is None else (cfg.alpha,))
    report["activations"] = {"base": "from derive" if base_kv is not None else "computed",
                             "aux": "from derive" if aux_inputs is not None else "computed"}
    return pred.eval(), report
