"""Calibration activations handed from derive to fit inside one process (`kvp run`).

Healing already runs the base over the calibration sequences (its residual stream at the
depths the aux must match) and the healed aux layer by layer (each layer's normed input).
The fit needs, over the same sequences, the base's pre-RoPE keys and values and the healed
aux's normed layer inputs: the same forward passes. So derive captures those too and leaves
them here, keyed by what they depend on (the model's weights and the token ids), and fit takes
them instead of running both models again (about half of the fit's time and a third of the
pair's). A fit in another process, or on other sequences or weights, finds nothing and runs the
passes itself; the result is the same either way (tests/test_core.py checks it).
"""

from __future__ import annotations

import hashlib

import torch

_STORE: dict[tuple, object] = {}


def digest(*tensors_or_models) -> str:
    """SHA-256 over tensors' bytes or models' parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for obj in tensors_or_models:
        items = obj.state_dict().items() if hasattr(obj, "state_dict") else [("", obj)]
        for name, t in items:
            t = t.detach().contiguous().cpu()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def put(kind: str, key: tuple, value) -> None:
    _STORE[(kind, *key)] = value


def take(kind: str, key: tuple):
    """The value left under (kind, key), removed (each is used once), or None."""
    return _STORE.pop((kind, *key), None)


def pending() -> bool:
    return bool(_STORE)


def clear() -> None:
    _STORE.clear()
