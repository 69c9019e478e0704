"""Token selection and the decoding loop shared by base, aux-alone and KVP paths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvp_validate.sampling import Sampling as SamplingParams

from .kvp import Prefilled


@dataclass(frozen=True)
class Sampling(SamplingParams):
    """Greedy when temperature == 0; otherwise temperature / top-k / top-p sampling (seeded).

    The parameters and their checks are the validator's (kvp_validate.runtime, which samples
    in numpy on onnxruntime); this adds the torch logits processors."""

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.temperature > 0:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@torch.no_grad()
def decode(
    model,
    pre: Prefilled,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_ids: set[int] | None = None,
    pad_id: int = 0,
    stop: Callable[[list[list[int]]], list[bool]] | None = None,
    stop_every: int = 8,
) -> torch.Tensor:
    """Generate up to max_new_tokens [B, T] from a prefill; finished rows are padded with pad_id.

    Tensors follow the prefill's device (CPU or CUDA). `stop(rows)`, called every `stop_every`
    steps with each row's generated ids so far, marks rows as finished (e.g. at a stop string);
    decoding ends once every row is finished."""
    dev = pre.logits.device
    gen = torch.Generator(device=dev).manual_seed(sampling.seed)
    procs = sampling.processors()
    logits, cache, mask, pos = pre.logits, pre.cache, pre.mask, pre.next_pos.clone()
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=dev)
    out: list[torch.Tensor] = []
    seen = torch.empty(logits.shape[0], 0, dtype=torch.long, device=dev)
    eos = torch.tensor(sorted(eos_ids or ()), dtype=torch.long, device=dev)
    for step in range(max_new_tokens):
        if sampling.temperature > 0:
            probs = torch.softmax(procs(seen, logits), dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        seen = torch.cat([seen, tok[:, None]], dim=1)
        if len(eos):
            done |= torch.isin(tok, eos)
        if stop is not None and (step + 1) % stop_every == 0:
            done |= torch.tensor(stop(seen.tolist()), dtype=torch.bool, device=dev)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        res = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], past_key_values=cache, use_cache=True)
        logits, cache, pos = res.logits[:, -1].float(), res.past_key_values, pos + 1
    return torch.stack(out, dim=1)
