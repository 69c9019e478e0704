"""The PyTorch modules converted to Core ML: KVP prefill and base decode over a fixed-size KV cache.

Batch 1, a cache of `context` slots per layer, slot = token position. The shapes are
static (the prompt length comes from a small enumerated set) because the Neural Engine
runs only static or enumerated shapes; the price is that decode attends over all
`context` slots under a mask, so the smallest context that fits is the fastest.

Prompts are right-padded to the exported length N; `last_index` is the last real
token's index n-1. Same semantics as KVPPrefill + Decoder (export/modules.py) and the
PyTorch KVP path (runtime/kvp.py), the KVP protocol's (kvp_validate.protocol, no tail):
- prefill: the aux reads the N tokens and the predictor writes the base's keys and values
  into slots 0..N-1; the base then runs the protocol's re-fed first step (`first_columns`:
  the s sink tokens and the last token) in one pass: the sinks see only themselves (their
  exact KV replaces the predicted one in slots 0..s-1), the last token sees slots 0..n-1 (its
  own KV replaces slot n-1). Slots n..N-1 hold predictions for padding: masked, and
  overwritten by decode before they are seen. The export refuses prompt lengths under
  `protocol.min_kvp_len` (export.check_shapes).
- decode: one token at `position` writes its KV into that slot and attends to slots
  0..position (position - W + 1..position on a sliding-window layer of window W; slot =
  position, so the window is exact).
Each layer rotates with its own RoPE table and attends with its own scale (the family's
adapter says which, models/adapters/).

Stateful (iOS 18): the cache is two registered buffers, [layers, 1, Hkv, context, D],
which coremltools turns into Core ML states, written by slice assignment. Stateless
(iOS 17): the same computation with the cache as inputs and outputs (see `Stateless*`).

Float16 choices (the Neural Engine computes in fp16 only):
- RoPE comes from cos/sin tables built in float32 at export, gathered by position
  (position x frequency in fp16 has a resolution of 2 past 2048);
- RMSNorm divides by the largest magnitude before squaring: coremltools drops HF's float32
  upcast, and SmolLM2-135M's residual reaches 2.4e4 (the sink token), whose square
  overflows fp16 (max 65504);
- the mask is additive and finite (-1e4), never finfo.min (-inf in fp16);
- the cache write at a runtime position is a select against a one-hot slot mask: a slice at
  a tensor-valued index would be frozen at the traced value;
- attention stays 4-D (query heads grouped per KV head), and the mask is tiled with concat:
  coremltools mis-converts `repeat` on a symbolic length.
"""

from __future__ import annotations

import torch
from torch import nn

from kvp_validate.protocol import first_columns

from ...models import arch
from ..modules import KVPPrefill, Layer, LayerPlan, attend

MASKED = -1e4  # additive mask: exp underflows to 0 in fp16, and never overflows like finfo.min


class ScaledRMSNorm(nn.Module):
    """RMSNorm that cannot overflow in float16: x / max|x| is squared, not x (same result).
    The per-channel factor is the adapter's `norm_weight` (w, or 1 + w in families that store
    the offset), times `out_scale`; `in_scale` is the scale its input carries (the residual
    stream's, see `fp16_safe`): RMSNorm ignores it but for eps, which is scaled to match."""

    def __init__(self, norm: nn.Module, ad, *, in_scale: float = 1.0, out_scale: float = 1.0):
        super().__init__()
        w = ad.norm_weight(norm)
        if isinstance(w, nn.Parameter) and out_scale == 1.0:
            self.weight = w
        else:
            self.register_buffer("weight", w.detach() * out_scale, persistent=False)
        self.eps = ad.norm_eps(norm) * in_scale**2

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-3)
        y = x / s
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps / s / s))


class Scale(nn.Module):
    """Multiplies by a constant (a branch's output onto the scaled residual stream)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def mask_bias(visible):
    return torch.where(visible, 0.0, MASKED)


def window_biases(windows, q_pos, k_pos) -> list[torch.Tensor]:
    """Per layer, the additive bias [T, K] of queries at q_pos [T] over keys at k_pos [K]:
    causal, and within the layer's window where it has one."""
    causal = k_pos[None, :] <= q_pos[:, None]
    by_window = {w: mask_bias(causal if w is None else causal & (q_pos[:, None] - k_pos[None, :] < w))
                 for w in dict.fromkeys(windows)}
    return [by_window[w] for w in windows]


class RopeTables(nn.Module):
    """cos, sin [context, D] per rotary kind in float32 with the model's own RoPE (scaling
    included), and which kind each layer uses."""

    def __init__(self, model, context: int):
        super().__init__()
        plan = LayerPlan(model)
        self.kinds, self.windows = plan.kinds, plan.windows
        for kind, (cos, sin) in arch.rope_by_kind(model, torch.arange(context)[None], torch.float32).items():
            self.register_buffer(f"cos_{kind}", cos[0], persistent=False)
            self.register_buffer(f"sin_{kind}", sin[0], persistent=False)

    def per_layer(self, select) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [1, T, D] per layer; `select` picks the rows of a [context, D] table."""
        by_kind = {k: (select(getattr(self, f"cos_{k}"))[None], select(getattr(self, f"sin_{k}"))[None])
                   for k in dict.fromkeys(self.kinds)}
        return [by_kind[k] for k in self.kinds]


def fp16_safe(layer: Layer) -> Layer:
    """The layer with norms that cannot overflow in float16, on a residual stream carried times the
    family's `fp16_residual_scale` (Gemma 3's outgrows float16's 65504 in fp32): the norms that read
    the residual are scale-invariant, so only what is added to it (each branch's output) and the
    embeddings (`scaled_embedding`) are multiplied."""
    r = layer.ad.fp16_residual_scale
    for name in ("norm1", "norm2"):
        setattr(layer, name, ScaledRMSNorm(getattr(layer, name), layer.ad, in_scale=r))
    for name in ("post1", "post2"):
        norm = getattr(layer, name)
        if norm is not None:
            setattr(layer, name, ScaledRMSNorm(norm, layer.ad, out_scale=r))
        elif r != 1.0:
            setattr(layer, name, Scale(r))
    for name in ("q_norm", "k_norm"):
        norm = getattr(layer, name)
        if norm is not None:
            setattr(layer, name, ScaledRMSNorm(norm, layer.ad))
    return layer


def scaled_embedding(embed: nn.Module, ad) -> nn.Module:
    """The embedding onto the residual stream's float16 scale (`fp16_safe`)."""
    r = ad.fp16_residual_scale
    return embed if r == 1.0 else nn.Sequential(embed, Scale(r))


class BaseStack(nn.Module):
    """The base's embeddings, layers, final norm, LM head and RoPE tables, shared by both functions."""

    def __init__(self, base, context: int):
        super().__init__()
        self.spec, ad = arch.ArchSpec.of(base), arch.adapter(base)
        self.embed = scaled_embedding(ad.embedding(base), ad)
        self.layers = nn.ModuleList(fp16_safe(Layer(layer, ad, self.spec)) for layer in ad.layers(base))
        r = ad.fp16_residual_scale
        self.norm, self.lm_head = ScaledRMSNorm(ad.final_norm(base), ad, in_scale=r), ad.lm_head(base)
        self.ropes = RopeTables(base, context)
        self.register_buffer("slots", torch.arange(context, dtype=torch.int32), persistent=False)

    def rope(self, pos):
        """cos, sin [1, T, D] per layer at positions pos [T]."""
        return self.ropes.per_layer(lambda t: t.index_select(0, pos))

    def logits(self, h):
        return self.lm_head(self.norm(h[:, -1]))


def cache_shape(base, context: int) -> tuple[int, int, int, int, int]:
    s = arch.ArchSpec.of(base)
    return (s.n_layers, 1, s.n_kv_heads, context, s.head_dim)


class _Prefill(nn.Module):
    def __init__(self, base, aux, predictor, sink_len: int, context: int):
        super().__init__()
        self.kvp = KVPPrefill(base, aux, predictor, sink_len)
        for layer in self.kvp.layers:
            fp16_safe(layer)
        ad = arch.adapter(aux)
        self.kvp.embed = scaled_embedding(self.kvp.embed, ad)
        self.kvp.final_norm = ScaledRMSNorm(self.kvp.final_norm, ad, in_scale=ad.fp16_residual_scale)
        self.base = BaseStack(base, context)
        self.aux_ropes = RopeTables(aux, context)
        self.sink_len = sink_len

    def run(self, input_ids, last_index):
        """-> logits [1, V], keys and values [layers, 1, Hkv, N, D] (slots 0..N-1 of the cache)."""
        n = input_ids.shape[1]
        bs = self.base.spec
        idx = self.base.slots[:n]
        aux_rope = self.aux_ropes.per_layer(lambda t: t[:n])
        aux_bias = window_biases(self.aux_ropes.windows, idx, idx)

        def step(j, layer, h):
            q, k, v, k_pre, v_pre, extra = layer.project(h, *aux_rope[j])
            return layer.finish(h, attend(q, k, v, aux_bias[j], layer.scale, "flat")), k_pre, v_pre, extra

        predicted = self.kvp.predict(self.kvp.embed(input_ids), step)

        s = self.sink_len
        pos = first_columns(0, last_index, s)  # the sink's, then the last token's: columns are positions here
        h = self.base.embed(input_ids.index_select(1, pos))
        q_rope, k_rope = self.base.rope(pos), self.base.ropes.per_layer(lambda t: t[:n])
        biases = window_biases(self.base.ropes.windows, pos, idx)
        is_last = (idx == last_index).view(1, 1, n, 1)
        keys, values = [], []
        for i, (layer, (pk, pv)) in enumerate(zip(self.base.layers, predicted)):
            pk = arch.apply_rope(pk.view(1, n, bs.n_kv_heads, bs.head_dim).transpose(1, 2), *k_rope[i])
            pv = pv.view(1, n, bs.n_kv_heads, bs.head_dim).transpose(1, 2)
            q, k, v, *_ = layer.project(h, *q_rope[i])
            k = torch.where(is_last, k[:, :, s:], torch.cat([k[:, :, :s], pk[:, :, s:]], dim=2))
            v = torch.where(is_last, v[:, :, s:], torch.cat([v[:, :, :s], pv[:, :, s:]], dim=2))
            h = layer.finish(h, attend(q, k, v, biases[i], layer.scale, "flat"))
            keys.append(k)
            values.append(v)
        return self.base.logits(h), torch.stack(keys), torch.stack(values)


class _Decode(nn.Module):
    def __init__(self, base, context: int):
        super().__init__()
        self.base = BaseStack(base, context)

    def run(self, input_ids, position, cache_k, cache_v):
        """-> logits [1, V], the updated cache [layers, 1, Hkv, context, D], this token's KV [layers, 1, Hkv, 1, D]."""
        slots = self.base.slots
        here = (slots == position).view(1, 1, -1, 1)
        biases = window_biases(self.base.ropes.windows, position, slots)
        ropes = self.base.rope(position)
        h = self.base.embed(input_ids)
        keys, values, new_k, new_v = [], [], [], []
        for i, layer in enumerate(self.base.layers):
            q, k_new, v_new, *_ = layer.project(h, *ropes[i])
            k = torch.where(here, k_new, cache_k[i])
            v = torch.where(here, v_new, cache_v[i])
            h = layer.finish(h, attend(q, k, v, biases[i], layer.scale, "flat"))
            keys.append(k)
            values.append(v)
            new_k.append(k_new)
            new_v.append(v_new)
        return self.base.logits(h), torch.stack(keys), torch.stack(values), torch.stack(new_k), torch.stack(new_v)


class StatefulPrefill(_Prefill):
    """prefill(input_ids [1, N] int32, last_index [1] int32) -> logits [1, V]; writes cache slots 0..N-1."""

    def __init__(self, base, aux, predictor, sink_len: int, context: int):
        super().__init__(base, aux, predictor, sink_len, context)
        self.register_buffer("key_cache", torch.zeros(cache_shape(base, context)))
        self.register_buffer("value_cache", torch.zeros(cache_shape(base, context)))

    def forward(self, input_ids, last_index):
        logits, k, v = self.run(input_ids, last_index)
        n = input_ids.shape[1]
        self.key_cache[:, :, :, :n] = k
        self.value_cache[:, :, :, :n] = v
        return logits


class StatefulDecode(_Decode):
    """decode(input_ids [1, 1] int32, position [1] int32) -> logits [1, V]; reads and updates the cache."""

    def __init__(self, base, context: int):
        super().__init__(base, context)
        self.register_buffer("key_cache", torch.zeros(cache_shape(base, context)))
        self.register_buffer("value_cache", torch.zeros(cache_shape(base, context)))

    def forward(self, input_ids, position):
        logits, k, v, _, _ = self.run(input_ids, position, self.key_cache, self.value_cache)
        self.key_cache[:] = k
        self.value_cache[:] = v
        return logits


class StatelessPrefill(_Prefill):
    """prefill(input_ids, last_index) -> logits, keys, values [layers, 1, Hkv, N, D].

    Hand-off: the caller copies keys/values into slots 0..N-1 of its own zeroed
    [layers, 1, Hkv, context, D] buffers and decodes from position n."""

    def forward(self, input_ids, last_index):
        return self.run(input_ids, last_index)


class StatelessDecode(_Decode):
    """decode(input_ids, position, key_cache, value_cache [layers, 1, Hkv, context, D]) -> logits, new_keys, new_values.

    new_keys/new_values [layers, 1, Hkv, 1, D] are this token's KV: the caller writes them into
    slot `position` of its buffers (returning only them saves copying the whole cache out)."""

    def forward(self, input_ids, position, key_cache, value_cache):
        logits, _, _, k, v = self.run(input_ids, position, key_cache, value_cache)
        return logits, k, v


def build(base, aux, predictor, sink_len: int, context: int, stateful: bool) -> tuple[nn.Module, nn.Module]:
    """(prefill, decode) modules in eval mode, weights shared with the HF models."""
    if stateful:
        mods = StatefulPrefill(base, aux, predictor, sink_len, context), StatefulDecode(base, context)
    else:
        mods = StatelessPrefill(base, aux, predictor, sink_len, context), StatelessDecode(base, context)
    return mods[0].eval(), mods[1].eval()
