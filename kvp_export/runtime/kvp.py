"""KV Prediction inference in PyTorch.

Prompt of N tokens (left-padded batches allowed):
1. the auxiliary model reads tokens 0..N-2 and the predictor turns its per-layer inputs
   into the base's keys (pre-RoPE, then rotated with the base's RoPE) and values;
2. the sink prefix (the first `sink_len` tokens of each prompt) gets the base's exact
   KV instead: the attention-sink position carries huge activations, and an approximate
   KV there wrecks every later attention (docs/method.md, "The attention sink"); it is
   written into the predicted cache (memoised by `SinkCache`);
3. the base reads token N-1 alone on top of that cache and emits the first token; with a
   `tail` of W it reads the last W+1 tokens instead, so the W tokens nearest the first
   generated one get exact KV (computed over the predicted cache), at the price of W more
   base tokens in the prefill;
4. every later step is ordinary base decoding; aux and predictor are not called again.

Steps 1-3 follow the KVP protocol (kvp_validate.protocol: `context_len` splits the prompt,
`first_step(refeed=False)` lays out step 3, the in-place form of the exported graphs' step).

`prefill_kvp` does steps 1-3, `prefill_full` is the plain baseline, `decode` is step 4
for either, so every path shares one decoding loop.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvp_validate.errors import check_at_least
from kvp_validate.protocol import context_len, continuation, first_real, first_step, positions

from ..errors import KvpError, check_choice
from ..models import arch
from ..predictor.features import predictor_inputs
from ..predictor.module import KVPredictor

KV_SOURCES = ("predictor", "mean", "none")


@dataclass
class Prefilled:
    """State after the prompt: the next-token logits and what decoding continues from."""

    logits: torch.Tensor  # [B, V] for the last prompt position
    cache: DynamicCache
    mask: torch.Tensor  # [B, N] attention mask over the cache (0 = padding or no KV)
    next_pos: torch.Tensor  # [B] position of the next token


def check_context(model, input_ids: torch.Tensor, extra: int = 0) -> None:
    limit = arch.context_length(model)
    if limit and input_ids.shape[1] + extra > limit:
        raise KvpError(
            f"prompt of {input_ids.shape[1]} tokens (+{extra} to generate) is longer than the context ({limit})"
        )


@torch.no_grad()
def prefill_full(model, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> Prefilled:
    """Ordinary prefill of the whole prompt (the baseline, and the aux-alone path)."""
    mask = torch.ones_like(input_ids) if mask is None else mask
    pos = positions(mask)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return Prefilled(out.logits[:, -1].float(), out.past_key_values, mask, pos[:, -1] + 1)


class SinkCache:
    """Exact base KV of sink prefixes, memoised by token ids.

    When every prompt starts with the same token (a BOS) or template, its KV is a
    constant: it is computed once and reused, so the exact sink costs nothing per call.
    """

    def __init__(self, base, max_entries: int = 64):
        self.base = base
        self.max_entries = max_entries
        self._memo: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    @torch.no_grad()
    def get(self, tokens: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if tokens not in self._memo:
            ids = torch.tensor([tokens], device=self.base.device)
            out = arch.adapter(self.base).decoder(self.base)(input_ids=ids, use_cache=True)
            cache = out.past_key_values
            self._memo[tokens] = [(cache.layers[i].keys[0], cache.layers[i].values[0]) for i in range(len(cache.layers))]
            if len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        self._memo.move_to_end(tokens)
        return self._memo[tokens]


@torch.no_grad()
def predict_kv(
    base, aux, predictor: KVPredictor, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, ctx_pos: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Predicted base KV for the context, per base layer: (rotated keys, values) [B, H, S, D]."""
    spec = arch.ArchSpec.of(base)
    xk, xv = predictor_inputs(aux, predictor.input_mode, input_ids=ctx_ids, attention_mask=ctx_mask,
                              position_ids=ctx_pos)
    # The predictor may keep float32 weights beside bf16 models (GPU): it computes in its own
    # dtype and hands the base its KV in the base's dtype (no-ops when everything is float32).
    pdt, bdt = predictor.mean_k.dtype, base.dtype
    if xk[0].dtype != pdt:
        xk = [x.to(pdt) for x in xk]
        xv = xk if input_mode_shared(predictor) else [x.to(pdt) for x in xv]
    out = []
    for (k, v), (cos, sin) in zip(predictor(xk, xv), arch.layer_rope(base, ctx_pos, pdt)):
        k = arch.apply_rope(arch.split_heads(k, spec.n_kv_heads), cos, sin)
        out.append((k.to(bdt), arch.split_heads(v, spec.n_kv_heads).to(bdt)))
    return out


def input_mode_shared(predictor: KVPredictor) -> bool:
    """In hidden mode K and V read the same aux activations (the same list)."""
    return predictor.input_mode == "hidden"


def _constant_kv(predictor: KVPredictor, spec, ctx_pos, base, source: str):
    """The trivial baselines' KV: the calibration mean per layer, or zeros (masked out)."""
    b, s = ctx_pos.shape
    dt = base.dtype
    out = []
    for i, (cos, sin) in enumerate(arch.layer_rope(base, ctx_pos, dt)):
        if source == "mean":
            k = predictor.mean_k[i].to(ctx_pos.device, dt).expand(b, s, -1)
            v = predictor.mean_v[i].to(ctx_pos.device, dt).expand(b, s, -1)
        else:
            k = v = torch.zeros(b, s, spec.kv_dim, device=ctx_pos.device, dtype=dt)
        k = arch.apply_rope(arch.split_heads(k, spec.n_kv_heads), cos, sin)
        out.append((k, arch.split_heads(v.contiguous(), spec.n_kv_heads)))  # the sink is written into it
    return out


@torch.no_grad()
def prefill_kvp(
    base,
    aux,
    predictor: KVPredictor | None,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    sink_len: int = 1,
    sinks: SinkCache | None = None,
    kv_source: str = "predictor",
    tail: int = 0,
) -> Prefilled:
    """KVP prefill of left-padded prompts [B, N]: aux + predictor, exact sink, base on the last token.

    kv_source "mean" / "none" swap the predictor for the trivial baselines (the calibration
    mean KV per layer; no prompt KV at all), keeping the same exact sink. `tail` W: the base
    reads the last W+1 tokens over the predicted KV of the others (at most N-2 of them, so at
    least one position is predicted); the aux reads only the tokens before them.
    """
    check_choice("kv source", kv_source, KV_SOURCES)
    if predictor is None and kv_source != "none":
        raise KvpError("a predictor is needed for kv source " + kv_source)
    check_at_least(0, sink=sink_len, tail=tail)
    mask = torch.ones_like(input_ids) if mask is None else mask
    n = input_ids.shape[1]
    c = context_len(n, tail)  # the predicted columns; the base reads the rest
    if c == 0:
        return prefill_full(base, input_ids, mask)  # nothing to predict
    step_ids, step_pos, step_mask = first_step(input_ids, mask, sink_len, tail=n - 1 - c, refeed=False)
    ctx_ids, ctx_mask = input_ids[:, :c], mask[:, :c]
    ctx_pos = positions(ctx_mask)

    if kv_source == "predictor":
        kv = predict_kv(base, aux, predictor, ctx_ids, ctx_mask, ctx_pos)
    else:
        kv = _constant_kv(predictor, arch.ArchSpec.of(base), ctx_pos, base, kv_source)
        if kv_source == "none":  # attend to the sink only
            step_mask = torch.cat([ctx_mask * (ctx_pos < sink_len), step_mask[:, c:]], dim=1)

    _write_exact_sink(kv, ctx_ids, ctx_mask, sink_len, sinks or SinkCache(base))

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    out = base(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, past_key_values=cache,
               use_cache=True, logits_to_keep=1)
    return Prefilled(out.logits[:, -1].float(), out.past_key_values, step_mask, step_pos[:, -1] + 1)


def _write_exact_sink(kv, ctx_ids, ctx_mask, sink_len: int, sinks: SinkCache) -> None:
    """Overwrite each prompt's sink slots in the predicted context [B, S] (its first `sink_len` real
    tokens, or all of a shorter context's) with their exact KV: the in-place form of the protocol's
    first step (kvp_validate.protocol.first_step, refeed=False)."""
    if sink_len == 0:
        return
    for b, (start, n) in enumerate(zip(first_real(ctx_mask).tolist(), ctx_mask.sum(-1).tolist())):
        s = min(sink_len, int(n))
        if s <= 0:
            continue
        exact = sinks.get(tuple(ctx_ids[b, start : start + s].tolist()))
        for i, (k, v) in enumerate(exact):
            kv[i][0][b, :, start : start + s] = k.to(kv[i][0].dtype)
            kv[i][1][b, :, start : start + s] = v.to(kv[i][1].dtype)


@torch.no_grad()
def score_continuation(model, pre: Prefilled, cont: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [B, T, V] for `cont` [B, T] after a prefill (the first row is pre.logits)."""
    if cont.shape[1] <= 1:
        return pre.logits[:, None]
    mask, pos = continuation(pre.mask, pre.next_pos, cont.shape[1] - 1)
    out = model(input_ids=cont[:, :-1], attention_mask=mask, position_ids=pos, past_key_values=pre.cache, use_cache=True)
    return torch.cat([pre.logits[:, None], out.logits.float()], dim=1)
