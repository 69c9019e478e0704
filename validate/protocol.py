"""The KVP protocol's shared rules, written once for every runtime (PyTorch, the ONNX export
modules, the numpy/onnxruntime runtime, Core ML): what a prompt must hold for the KVP path, and
where its tokens sit. docs/architecture.md, "The KVP protocol and the sink rule".

Imports neither numpy nor torch: `positions` uses only methods that numpy arrays and torch
tensors share, so both runtimes (and the graphs traced from the PyTorch modules) call it.
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
