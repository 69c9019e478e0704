"""Healing a layer-pruned auxiliary model so its hidden states track the base's.

A raw pruned model drifts so far from the base that its KV carries little (docs/method.md,
"Healing a layer-pruned aux"). Healing fits, layer by layer and on the aux's *actual* (already
healed) activations, each kept layer so that its output matches the base's residual
stream at the depth the next kept layer expects: after the run of removed layers it
stands in for (every kept layer gets such a bridge, also when nothing was removed after
it, which corrects accumulated drift).

- `bridge` (closed form): refit the kept layer's MLP down_proj by ridge regression on
  the MLP's inner activations, shrunk towards the original weights. It generalises
  ReplaceMe's linear replacement of the removed run (a map after down_proj), folded
  exactly into weights the layer already has: zero inference cost, no architecture change.
- `distill` (block-wise): the bridge fit, then a few Adam epochs on all of the kept
  layer's weights against the same target (weighted MSE), still one layer at a time.

Tokens are weighted 1 / ||target||^2: the attention-sink position's residual norm is
orders of magnitude larger than the rest, and would otherwise dominate the fit.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import DeriveConfig, Heal, choices, default_of
from ..errors import check_choice
from ..linalg import choose_alpha, ridge_solve
from ..models import arch
from ..predictor import shared
from ..predictor.features import capture

METHODS = choices(Heal)
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def targets_depths(kept: list[int], n_base: int) -> list[int]:
    """Base layer after which aux layer j's output should match: the one before the next kept layer."""
    return [(kept[j + 1] - 1 if j + 1 < len(kept) else n_base - 1) for j in range(len(kept))]


@torch.no_grad()
def _base_targets(base, seqs, depths: list[int], batch: int, kv: tuple[list, list] | None = None,
                  progress: bool = False) -> dict[int, torch.Tensor]:
    """The base's residual stream after each layer in `depths`, for every sequence. With `kv`
    (two lists of [N, S, kv_dim] tensors), the same pass also fills every layer's pre-RoPE keys
    and values (what the predictor fit needs; see predictor/shared.py)."""
    want = set(depths)
    spec = arch.ArchSpec.of(base)
    out = {d: torch.empty(*seqs.shape, spec.hidden) for d in want}
    last = spec.n_layers - 1 if kv is not None else max(want)
    bar = tqdm(total=len(seqs), desc="heal: base activations", unit="seq", disable=not progress)
    with capture(base, hidden=False, kv=kv is not None) as got:
        for s in range(0, len(seqs), batch):
            bar.update(len(seqs[s : s + batch]))
            for i, _, h in arch.layer_io(base, seqs[s : s + batch]):
                if i in want:
                    out[i][s : s + batch] = h
                if kv is not None:
                    kv[0][i][s : s + batch], kv[1][i][s : s + batch] = got.keys[i], got.values[i]
                if i >= last:
                    break
    bar.close()
    return out


def _weights(y: torch.Tensor) -> torch.Tensor:
    return 1.0 / y.float().pow(2).sum(-1, keepdim=True).clamp(min=1e-6)


@torch.no_grad()
def _fit_bridge(run: arch.LayerRunner, j: int, layer, h_all, y_all, batch: int, val_every: int = 8,
                keep: bool = False):
    """The closed-form bridge: refit down_proj by weighted ridge regression.

    Minimises sum_t w_t ||layer(h_t) - y_t||^2 over down_proj's weight, holding the MLP's
    inner activations fixed, shrunk towards the original weight (with a norm after down_proj,
    the family adapter's `down_target` says what down_proj's output should be); alpha is chosen on every
    `val_every`-th sequence. (Refitting o_proj jointly was measured worse: it shifts the MLP's
    input, so the activations the fit held fixed no longer hold; drift rose from ~0.2 to ~0.35.)
    A norm after down_proj fixes the branch's size per token whatever down_proj does, so its
    per-channel factor is refitted too (`_fit_post_scale`). The layer keeps its original weights
    when the bridge does worse on the validation sequences than not moving.
    With `keep`, also returns the layer's new output (from the parts computed here: only
    down_proj and the post norm changed, so the layer need not run again).
    """
    down = run.ad.down_proj(run.ad.mlp(layer))
    w0 = down.weight.detach().T.double()  # [inter, hidden]
    d = w0.shape[0]
    mom = {k: [torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, w0.shape[1], dtype=torch.float64), 0.0]
           for k in ("fit", "val")}
    parts = []
    for s in range(0, len(h_all), batch):
        h, y = h_all[s : s + batch], y_all[s : s + batch]
        a, m = run.mlp_parts(j, layer, h)
        parts.append((a, m))
        sw = _weights(y).sqrt()
        d = down(m)
        miss = run.ad.down_target(layer, y - a, d) - d  # what down_proj's output misses
        x, r = (m * sw).flatten(0, 1), (miss * sw).flatten(0, 1)
        for b in range(h.shape[0]):
            split = "val" if _is_val(s + b, val_every) else "fit"
            rows = slice(b * h.shape[1], (b + 1) * h.shape[1])
            xb, rb = x[rows], r[rows]
            mom[split][0] += (xb.T @ xb).double()
            mom[split][1] += (xb.T @ rb).double()
            mom[split][2] += float(rb.double().pow(2).sum())
    alpha, val_err = choose_alpha(tuple(mom["fit"]), tuple(mom["val"]), ALPHAS)
    post = run.ad.mlp_post_norm(layer)
    before = _val_error(run, layer, parts, y_all, batch, val_every)
    originals = [down.weight.clone()] + ([post.weight.clone()] if post is not None else [])
    w = w0 + ridge_solve(mom["fit"][0] + mom["val"][0], mom["fit"][1] + mom["val"][1], alpha)
    down.weight.copy_(w.T.to(down.weight.dtype))
    stats = {"alpha": alpha, "val_residual_kept": val_err / max(mom["val"][2], 1e-30)}
    if post is not None:
        stats["post_norm_alpha"] = _fit_post_scale(run.ad, post, down, parts, y_all, batch, val_every)
    after = _val_error(run, layer, parts, y_all, batch, val_every)
    stats["val_error_ratio"] = after / max(before, 1e-30)  # the layer's output error, bridged / not moved
    if after > before:
        for p, p0 in zip([down.weight] + ([post.weight] if post is not None else []), originals):
            p.copy_(p0)
        stats["reverted"] = True
    if not keep:
        return stats
    return stats, torch.cat([a + run.mlp_out(layer, down(m)) for a, m in parts])


def _is_val(index: int, val_every: int) -> bool:
    return index % val_every == val_every - 1


def _val_error(run: arch.LayerRunner, layer, parts, y_all, batch: int, val_every: int) -> float:
    """The layer's weighted output error on the validation sequences, from the fit's parts."""
    down, err = run.ad.down_proj(run.ad.mlp(layer)), 0.0
    for k, (a, m) in enumerate(parts):
        y = y_all[k * batch : (k + 1) * batch]
        val = torch.tensor([_is_val(k * batch + b, val_every) for b in range(len(y))])
        if val.any():
            out = a[val] + run.mlp_out(layer, down(m[val]))
            err += float(((out - y[val]).pow(2).sum(-1, keepdim=True) * _weights(y[val])).double().sum())
    return err


def _fit_post_scale(ad, post, down, parts, y_all, batch: int, val_every: int) -> float:
    """Refit the per-channel factor g of the RMSNorm after down_proj, in closed form.

    The branch is g * n(d), n the unweighted RMS normalisation of down_proj's output d: its
    size per token is set by g alone, so when the bridge must add more (or less) than the
    original branch did (the removed layers' share of the residual), only g can supply it.
    Weighted least squares per channel, shrunk towards the original g by alpha (relative to
    the channel's sum of squares), alpha chosen on the validation sequences. Returns alpha.
    """
    g0 = ad.norm_weight(post).detach().double()
    eps = ad.norm_eps(post)
    mom = {k: [torch.zeros_like(g0), torch.zeros_like(g0)] for k in ("fit", "val")}
    for k, (a, m) in enumerate(parts):
        y = y_all[k * batch : (k + 1) * batch]
        n = torch.nn.functional.rms_norm(down(m).float(), (g0.shape[0],), eps=eps).double()
        t, w = (y - a).double(), _weights(y).double()
        for b in range(len(y)):
            split = "val" if _is_val(k * batch + b, val_every) else "fit"
            mom[split][0] += (w[b] * n[b] * n[b]).sum(0)
            mom[split][1] += (w[b] * n[b] * t[b]).sum(0)

    def solve(nn_, nt, alpha):
        return (nt + alpha * nn_ * g0) / ((1 + alpha) * nn_).clamp(min=1e-30)

    def val_sse(g):  # sum_t w (g n - t)^2 less the constant sum_t w t^2
        return float((g * g * mom["val"][0] - 2 * g * mom["val"][1]).sum())

    alpha = min((0.0, *ALPHAS), key=lambda al: val_sse(solve(*mom["fit"], al)))
    g = solve(mom["fit"][0] + mom["val"][0], mom["fit"][1] + mom["val"][1], alpha)
    ad.set_norm_weight(post, g)
    return alpha


def _distill(run: arch.LayerRunner, j: int, layer, h_all, y_all, batch: int, epochs: int, lr: float) -> float:
    """A few epochs of Adam on one layer against its target (weighted MSE)."""
    params = [p for p in layer.parameters() if p.dtype.is_floating_point]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * ((len(h_all) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    loss_val = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(h_all), generator=gen, device="cpu")  # the same order on any device
        for s in range(0, len(order), batch):
            idx = order[s : s + batch].to(h_all.device)
            h, y = h_all[idx], y_all[idx]
            out = run.run(j, layer, h)
            loss = ((out - y).pow(2).sum(-1, keepdim=True) * _weights(y)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            loss_val = loss.item()
    for p in params:
        p.requires_grad_(False)
    return loss_val


def heal(base, aux, kept: list[int], seqs: torch.Tensor, method: str = "bridge", *, batch: int = 4,
         distill_epochs: int = default_of(DeriveConfig, "distill_epochs"),
         distill_lr: float = default_of(DeriveConfig, "distill_lr"), share: bool = False, progress: bool = True) -> dict:
    """Heal `aux` (a pruned copy of `base` keeping `kept`) in place. Returns per-layer statistics.

    With `share`, the passes over the calibration sequences also leave what the predictor fit
    needs (the base's keys and values, the healed aux's normed layer inputs) in
    predictor/shared.py, for a fit in the same process."""
    check_choice("healing method", method, METHODS)
    if method == "none":
        return {"method": "none"}
    spec = arch.ArchSpec.of(base)
    n_base = spec.n_layers
    depths = targets_depths(kept, n_base)
    kv = None
    if share:
        kv = tuple([torch.empty(*seqs.shape, spec.kv_dim) for _ in range(n_base)] for _ in range(2))
    targets = _base_targets(base, seqs, depths, batch, kv, progress)
    run = arch.LayerRunner(aux)
    layers = run.ad.layers(aux)
    stats, inputs = [], []
    with torch.no_grad():
        h = torch.cat([run.embed(seqs[s : s + batch]) for s in range(0, len(seqs), batch)])
    for j in tqdm(range(len(layers)), desc=f"heal ({method})", unit="layer", disable=not progress):
        layer, y = layers[j], targets.pop(depths[j])  # each depth is one layer's target: free it after
        if share:
            with torch.no_grad():  # the normed state entering attention: the predictor's hidden input
                norm = run.ad.input_norm(layer)
                inputs.append(torch.cat([norm(h[s : s + batch]) for s in range(0, len(h), batch)]))
        if method == "bridge":  # only down_proj changes: the new output comes from the fit's own parts
            fitted, h = _fit_bridge(run, j, layer, h, y, batch, keep=True)
            st = {"layer": kept[j], "target_depth": depths[j], **fitted}
        else:
            st = {"layer": kept[j], "target_depth": depths[j], **_fit_bridge(run, j, layer, h, y, batch)}
            st["distill_loss"] = _distill(run, j, layer, h, y, batch, distill_epochs, distill_lr)
            with torch.no_grad():
                h = torch.cat([run.run(j, layer, h[s : s + batch]) for s in range(0, len(h), batch)])
        with torch.no_grad():
            st["rel_drift"] = float(((h - y).norm(dim=-1) / y.norm(dim=-1).clamp(min=1e-6))[:, 1:].mean())
        stats.append(st)
        del y
    if share:
        with torch.no_grad():
            norm = run.ad.final_norm(aux)
            inputs.append(torch.cat([norm(h[s : s + batch]) for s in range(0, len(h), batch)]))
        tokens = shared.digest(seqs)
        shared.put("base_kv", (shared.digest(base), tokens), kv)
        shared.put("aux_hidden", (shared.digest(aux), tokens), inputs)
    return {"method": method, "layers": stats, "tokens": int(seqs.numel())}
