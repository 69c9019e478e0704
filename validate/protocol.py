"""The KVP protocol's shared rules, written once for every runtime (PyTorch, the ONNX export
modules, the numpy/onnxruntime runtime, Core ML): what a prompt must hold for the KVP path,
where its tokens sit, and what the base's steps after a prefill are fed.
docs/architecture.md, "The KVP protocol and the sink rule".

Imports neither numpy nor torch: every function takes numpy arrays or torch tensors (the few
operations the two spell differently go through `_ops`, which imports torch only when given a
tensor), so both runtimes, and the graphs traced from the PyTorch modules, call the same code.
"""

from __future__ import annotations

from .errors import KvpError


def min_kvp_len(sink_len: int, tail: int = 0) -> int:
    """The shortest prompt the KVP path takes: the sink, at least as many predicted tokens (the
    exported graphs' first step drops the predicted sink slots from its mask), the last token, and
    with a `tail` of W the W tokens before it that the base reads exactly (the prediction graph
    reads the prompt without them). A shorter prompt goes through the base; eval, the Core ML
    export and a recipe's TTFT lengths are checked against it."""
    return 2 * sink_len + 2 + tail


def check_tail(tail: int, shortest: int | None = None) -> None:
    """A tail is W >= 0 prompt tokens before the last one, so a prompt must hold more than W
    tokens (`shortest`: the shortest prompt's real tokens)."""
    if tail < 0:
        raise KvpError(f"tail must be >= 0, got {tail}")
    if shortest is not None and tail >= shortest:
        raise KvpError(f"tail {tail} needs prompts of more than {tail} tokens (shortest: {shortest})")


def positions(mask):
    """Each token's position from a left-padded attention mask [..., N] (a numpy array or a torch
    tensor of 0/1): the count of real tokens before it; padding slots get 0. Integer masks give
    int64 positions on both."""
    return (mask.cumsum(-1) - 1).clip(min=0)


def first_step(input_ids, mask, sink_len: int):
    """What the base's first step after KVP prefill is fed, for left-padded prompts [B, N] whose
    first N - 1 columns got predicted KV -> (ids [B, s+1], positions [B, s+1], mask [B, N+s]):
    the s sink tokens (each prompt's first s real tokens, at positions 0..s-1) and the last
    prompt token at its position; the mask is the context's with the predicted sink slots
    dropped (this step computes the sink's exact KV, appended after the context), then s + 1
    ones. One read of the base's weights gives the exact sink and the first token's logits.
    Every prompt must hold at least `min_kvp_len(sink_len)` tokens."""
    cat, arange, take, ones = _ops(input_ids)
    n = input_ids.shape[-1]
    start = n - mask.sum(-1)[:, None]  # left padding: each prompt's first real column [B, 1]
    cols = cat([start + arange(sink_len), start * 0 + (n - 1)])  # the sink's columns, then the last
    pos = positions(mask)  # the context's positions are its first N - 1: one cumsum serves both
    kept = mask[:, :-1] * (pos[:, :-1] >= sink_len)
    return take(input_ids, cols), take(pos, cols), cat([kept, ones(mask, sink_len + 1)])


def continuation(mask, next_pos, t: int):
    """The mask [B, M + t] and positions [B, t] that feed t more tokens after a prefill whose cache
    mask is `mask` [B, M] and whose next position is `next_pos` [B] (teacher-forced scoring)."""
    cat, arange, _take, ones = _ops(mask)
    return cat([mask, ones(mask, t)]), next_pos[:, None] + arange(t)


def _ops(x):
    """(concatenate along the last axis, arange, gather along the last axis, ones [B, k] like a
    [B, ...] array) in x's library: torch for a tensor (imported only then: the validator never
    imports torch), numpy otherwise."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return (lambda parts: torch.cat(parts, dim=-1), lambda k: torch.arange(k, device=x.device),
                lambda a, idx: torch.gather(a, -1, idx),
                lambda a, k: torch.ones(a.shape[0], k, dtype=a.dtype, device=a.device))
    import numpy as np

    return (lambda parts: np.concatenate(parts, axis=-1), np.arange, lambda a, idx: np.take_along_axis(a, idx, -1),
            lambda a, k: np.ones((a.shape[0], k), a.dtype))
