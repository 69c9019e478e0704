"""Capturing what the predictor reads and what it must reproduce.

Forward hooks on each layer's k_proj / v_proj (found by the family's adapter) see, in one pass:
- the normed hidden state entering attention (k_proj's input): the "hidden" input mode;
- pre-RoPE keys (after the key norm on qk-norm models) and values: the "kv" input mode,
  and the targets the predictor is fitted to.
With `hidden`, the output of the final norm is recorded too, as entry n_layers: it is
the normed state the aux layer after the last one would read.
Hooking the projections gives pre-RoPE keys directly, with no un-rotation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..models import arch


@dataclass
class Captured:
    hidden: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, S, hidden], + final
    keys: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, S, kv_dim], pre-RoPE
    values: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, S, kv_dim]


@contextlib.contextmanager
def capture(model, *, hidden: bool = True, kv: bool = True, detach: bool = True) -> Iterator[Captured]:
    """Record per-layer attention inputs during the forward passes run inside the block.

    `detach=False` keeps them in the autograd graph (end-to-end training backpropagates
    through the predictor into the aux)."""
    spec, ad = arch.ArchSpec.of(model), arch.adapter(model)
    layers = ad.layers(model)
    got = Captured([None] * (len(layers) + 1), [None] * len(layers), [None] * len(layers))
    handles = []
    keep = torch.Tensor.detach if detach else (lambda t: t)

    def on_k(i, layer):
        def hook(_mod, inp, out):
            if hidden:
                got.hidden[i] = keep(inp[0])
            if kv:
                got.keys[i] = keep(arch.normalize_keys(ad, layer, out, spec.n_kv_heads))

        return hook

    def on_v(i):
        def hook(_mod, _inp, out):
            got.values[i] = keep(out)

        return hook

    def on_final(_mod, _inp, out):
        got.hidden[len(layers)] = keep(out)

    try:
        if hidden:
            handles.append(ad.final_norm(model).register_forward_hook(on_final))
        for i, layer in enumerate(layers):
            _q, k_proj, v_proj, _o = ad.projections(layer)
            handles.append(k_proj.register_forward_hook(on_k(i, layer)))
            if kv:
                handles.append(v_proj.register_forward_hook(on_v(i)))
        yield got
    finally:
        for h in handles:
            h.remove()


def predictor_inputs(aux, input_mode: str, **forward) -> tuple[list, list]:
    """Run the aux decoder (no LM head) and return per aux layer (x_k, x_v) for `input_mode`."""
    hidden = input_mode == "hidden"
    with capture(aux, hidden=hidden, kv=not hidden) as got:
        arch.adapter(aux).decoder(aux)(use_cache=False, **forward)
    return (got.hidden, got.hidden) if hidden else (got.keys, got.values)


def true_kv(base, **forward) -> tuple[list, list]:
    """Run the base decoder (no LM head) and return per layer (pre-RoPE keys, values)."""
    with capture(base, hidden=False, kv=True) as got:
        arch.adapter(base).decoder(base)(use_cache=False, **forward)
    return got.keys, got.values
