"""The KV predictor: one linear map (with bias) per base layer for keys and one for values.

Applied per token on merged heads, so heads mix and tokens do not:
[B, S, in] -> Linear -> [B, S, H_b * D_b]. Keys are predicted in pre-RoPE space (after
the base's key norm, where it has one); the runtime rotates them to their positions.

Sources: base layer i reads aux layer layer_map[i] (the paper). With `two_sided`
sources (hidden input), a base layer that the aux skipped also reads the next aux
layer's input (or the aux's final normed state): its depth lies between the two, and
the pair lets the linear map interpolate, which absorbs much of the aux's drift.

Reduced rank (`rank` r, hidden input): each base layer's map is factorised as
x -> down (r wide, no bias) -> k / v (with bias), the first factor shared by the layer's K and V.
The export fuses `down` into the aux's q/k/v projection as the full map is today, so the aux's
matmul grows by r columns per base layer instead of 2 x the KV width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import InputMode, choices, rank_problem
from ..errors import KvpError, check_choice

INPUT_MODES = choices(InputMode)
WEIGHTS = "predictor.safetensors"


def gather(xs: list[torch.Tensor], src: list[int]) -> torch.Tensor:
    """Concatenate the captured inputs of the source aux layers along features."""
    return xs[src[0]] if len(src) == 1 else torch.cat([xs[j] for j in src], dim=-1)


def two_sided_sources(layer_map: list[int], kept_exact: list[bool], n_aux: int) -> list[list[int]]:
    """[j] for base layers the aux computes at the same depth, [j, j+1] for the others.

    Index n_aux is the aux's final normed state (see features.capture)."""
    return [[j] if exact else [j, min(j + 1, n_aux)] for j, exact in zip(layer_map, kept_exact)]


def window_sources(layer_map: list[int], n_aux: int, radius: int = 1) -> list[list[int]]:
    """[j - radius, ..., j + radius] around each base layer's aux layer (clipped; n_aux is the
    aux's final normed state): more views of a drifted aux for the linear map to combine."""
    return [list(range(max(0, j - radius), min(n_aux, j + radius) + 1)) for j in layer_map]


class KVPredictor(nn.Module):
    def __init__(self, layer_map: list[int], input_mode: str, in_dim_k: int, in_dim_v: int, out_dim: int,
                 sources: list[list[int]] | None = None, rank: int | None = None):
        super().__init__()
        check_choice("predictor input", input_mode, INPUT_MODES)
        if (why := rank_problem(input_mode, rank)) is not None:
            raise KvpError(why)
        self.layer_map = list(layer_map)
        self.sources = [list(s) for s in sources] if sources else [[j] for j in layer_map]
        if len(self.sources) != len(self.layer_map):
            raise KvpError("predictor sources must list one entry per base layer")
        self.input_mode = input_mode
        self.dims = {"in_k": in_dim_k, "in_v": in_dim_v, "out": out_dim}
        self.rank = rank
        # with a rank: down[i] [in -> r] shared by K and V, then k[i] / v[i] [r -> out]
        self.down = nn.ModuleList(nn.Linear(in_dim_k * len(s), rank, bias=False) for s in self.sources) if rank \
            else None
        self.k = nn.ModuleList(nn.Linear(rank or in_dim_k * len(s), out_dim) for s in self.sources)
        self.v = nn.ModuleList(nn.Linear(rank or in_dim_v * len(s), out_dim) for s in self.sources)
        # Per-layer mean K and V over calibration tokens: the "mean KV" baseline that
        # every report shows beside KVP (a predictor must beat it to be worth anything).
        self.register_buffer("mean_k", torch.zeros(len(layer_map), out_dim))
        self.register_buffer("mean_v", torch.zeros(len(layer_map), out_dim))

    @property
    def n_base_layers(self) -> int:
        return len(self.layer_map)

    def forward(self, xk: list[torch.Tensor], xv: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per base layer (pre-RoPE keys, values) [B, S, out] from per-aux-layer inputs."""
        concat: dict[tuple, torch.Tensor] = {}  # base layers with the same sources share one concat

        def inputs(xs: list[torch.Tensor], src: list[int]) -> torch.Tensor:
            key = (id(xs), *src)  # in hidden mode xk is xv: K and V share it too
            if key not in concat:
                concat[key] = gather(xs, src)
            return concat[key]

        if self.down is not None:
            zs = [self.down[i](inputs(xk, s)) for i, s in enumerate(self.sources)]
            return [(self.k[i](z), self.v[i](z)) for i, z in enumerate(zs)]
        return [(self.k[i](inputs(xk, s)), self.v[i](inputs(xv, s))) for i, s in enumerate(self.sources)]

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of the predictor for one token (every base layer's K and V)."""
        maps = [*self.k, *self.v, *(self.down or [])]
        return 2 * sum(lin.in_features * lin.out_features for lin in maps)

    @classmethod
    def identity(cls, n_layers: int, dim: int) -> KVPredictor:
        """K -> K, V -> V on an aux equal to the base: the exactness check of the runtime."""
        p = cls(list(range(n_layers)), "kv", dim, dim, dim)
        with torch.no_grad():
            for lin in [*p.k, *p.v]:
                lin.weight.copy_(torch.eye(dim))
                lin.bias.zero_()
        return p

    # --- persistence: safetensors weights + JSON config in the header metadata ---

    def config(self) -> dict:
        rank = {"rank": self.rank} if self.rank else {}  # absent: full rank (files written before ranks)
        return {"layer_map": self.layer_map, "sources": self.sources, "input_mode": self.input_mode, **self.dims,
                **rank}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / WEIGHTS
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"kvp_predictor": json.dumps(self.config())})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> KVPredictor:
        path = Path(folder) / WEIGHTS
        if not path.is_file():
            raise KvpError(f"no predictor weights in {folder} (expected {WEIGHTS})")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                cfg = json.loads((f.metadata() or {})["kvp_predictor"])
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any corruption is the user's file
            raise KvpError(f"unreadable predictor {path}: {e}") from None
        p = cls(cfg["layer_map"], cfg["input_mode"], cfg["in_k"], cfg["in_v"], cfg["out"], cfg.get("sources"),
                cfg.get("rank"))
        try:
            p.load_state_dict(state)
        except RuntimeError as e:
            raise KvpError(f"predictor {path} does not match its own config: {str(e).splitlines()[0]}") from None
        return p.eval()
