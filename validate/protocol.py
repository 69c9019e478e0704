"""The KVP protocol's shared rules, written once for every runtime (PyTorch, the ONNX export
modules, the numpy/onnxruntime runtime, Core ML): what a prompt must hold for the KVP path,
where its tokens sit, and what the base's steps after a prefill are fed.
docs/architecture.md, "The KVP protocol and the sink rule".

Imports neither numpy nor torch: every function takes numpy arrays or torch tensors (the few
operations the two spell differently go through `_ops`, which imports torch only when given a
tensor), so both runtimes, and the graphs traced from the PyTorch modules, call the same code.
"""

from __future__ import annotations

from .errors import KvpError, check_at_least

PATHS = ("kvp", "base", "aux")  # the three prefill paths, as measured and compared
MODES = ("auto", *PATHS)  # what a caller may ask a runtime for: auto is KVP from the crossover on


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
    check_at_least(0, tail=tail)
    if shortest is not None and tail >= shortest:
        raise KvpError(f"tail {tail} needs prompts of more than {tail} tokens (shortest: {shortest})")


def positions(mask):
    """Each token's position from a left-padded attention mask [..., N] (a numpy array or a torch
    tensor of 0/1): the count of real tokens before it; padding slots get 0. Integer masks give
    int64 positions on both."""
    return (mask.cumsum(-1) - 1).clip(min=0)


def context_len(n: int, tail: int = 0) -> int:
    """How many of a prompt's N columns get predicted KV: those before the last token and the W
    tail tokens before it. A prompt of `min_kvp_len` tokens or more keeps W as given (the exported
    runtime refuses shorter ones); the PyTorch runtime takes any prompt: W is clamped so that one
    column is predicted, and a 1-token prompt has nothing to predict (0: a plain prefill)."""
    return max(n - 1 - tail, min(n - 1, 1))


def first_real(mask):
    """Each left-padded prompt's first real column [B] (its first sink token's)."""
    return mask.shape[-1] - mask.sum(-1)


def first_columns(start, last, sink_len: int, tail: int = 0):
    """The prompt columns the base's first step reads when it re-feeds the sink: the s sink columns
    from `start` (each prompt's first real column), then the W tail columns and `last` (the last
    token's column). Left-padded batches pass start [B, 1] and last [B, 1]; Core ML's one
    right-padded prompt passes start 0 and last = `last_index` [1], its columns being its positions."""
    cat, arange, _take, _ones = _ops(last)
    return cat([start + arange(sink_len), last if tail == 0 else last - tail + arange(tail + 1)])


def first_step(input_ids, mask, sink_len: int, *, tail: int = 0, refeed: bool = True):
    """What the base's first step after a KVP prefill is fed, for left-padded prompts [B, N] whose
    first c = N - 1 - W columns got predicted KV (`tail` W, already clamped by `context_len`)
    -> (ids [B, k], positions [B, k], mask [B, c + k]): the last token and the W tail tokens
    before it (columns c..N-1) at their positions, and, by where the sink's exact KV lives:
    - refeed (the exported graphs; Core ML, whose step is the same but writes that KV into the
      sink's slots of its fixed cache): first the s sink tokens (each prompt's first s real
      tokens, at positions 0..s-1); the context mask drops the predicted sink slots (this step
      computes the sink's exact KV, appended after the context), then k = s + 1 + W ones. One read
      of the base's weights gives the exact sink and the first token's logits. Every prompt must
      hold at least `min_kvp_len(sink_len, tail)` tokens.
    - in place (refeed=False, the PyTorch runtime): the sink's exact KV already replaced the
      predicted one in its slots, so the step is columns c..N-1 over the prompt's own mask
      (k = 1 + W); a prompt of any length is taken."""
    cat, _arange, take, ones = _ops(input_ids)
    end = -1 - tail  # the context's end, counted from the right (no size to trace into the graphs)
    pos = positions(mask)  # the context's positions are its first c: one cumsum serves both
    if not refeed:
        return input_ids[:, end:], pos[:, end:], mask
    start = first_real(mask)[:, None]
    cols = first_columns(start, start * 0 + (mask.shape[-1] - 1), sink_len, tail)
    kept = mask[:, :end] * (pos[:, :end] >= sink_len)
    return take(input_ids, cols), take(pos, cols), cat([kept, ones(mask, sink_len + 1 + tail)])


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

        index = torch.int32 if x.dtype == torch.int32 else torch.int64  # Core ML's int32 indices stay int32
        return (lambda parts: torch.cat(parts, dim=-1), lambda k: torch.arange(k, dtype=index, device=x.device),
                lambda a, idx: torch.gather(a, -1, idx),
                lambda a, k: torch.ones(a.shape[0], k, dtype=a.dtype, device=a.device))
    import numpy as np

    return (lambda parts: np.concatenate(parts, axis=-1), np.arange, lambda a, idx: np.take_along_axis(a, idx, -1),
            lambda a, k: np.ones((a.shape[0], k), a.dtype))
