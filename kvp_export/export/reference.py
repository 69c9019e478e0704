"""Reference outputs of the PyTorch path, stored with an export for the validator's parity checks.

Fixed inputs (two real held-out prompts, the second left-padded) go through the HF models
and the PyTorch KVP runtime, never through export/modules.py: parity then checks the
graphs against the reference implementation, not against the code they were traced from.
Saved as a plain .npz (numpy loads it without pickle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvp_validate.protocol import positions

from ..runtime.decode import decode
from ..runtime.kvp import predict_kv, prefill_full, prefill_kvp

REFERENCE = "reference.npz"
GREEDY_TOKENS = 8
LENGTH = 32  # reference prompt tokens without a tail
REFERENCE_PAD = 5  # left padding of the second reference row


def reference_length(tail: int = 0) -> int:
    """Reference prompts' length (at most the stored prompts'): LENGTH, and with a tail W, W more
    (the padded row still takes KVP with its exact tail)."""
    return LENGTH + tail


def reference_inputs(prompts: torch.Tensor, length: int = LENGTH, pad: int = REFERENCE_PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of `length` tokens from real prompts; row 1 is left-padded by `pad`."""
    ids = prompts[:2, -length:].clone()
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


@torch.no_grad()
def build_reference(base, aux, predictor, sink_len: int, ids: torch.Tensor, mask: torch.Tensor, pad_id: int,
                    tail: int = 0) -> dict:
    """The paths' first-token logits and greedy tokens (KVP with the export's `tail`), and the
    predicted cache of the whole prompt but its last token (what kvp_prefill outputs for it)."""
    ref: dict[str, np.ndarray] = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    paths = {
        "base": (base, lambda: prefill_full(base, ids, mask)),
        "aux": (aux, lambda: prefill_full(aux, ids, mask)),
        "kvp": (base, lambda: prefill_kvp(base, aux, predictor, ids, mask, sink_len=sink_len, tail=tail)),
    }
    for name, (model, run) in paths.items():
        pre = run()  # decode reads pre.logits before it extends the cache
        ref[f"{name}.logits"] = pre.logits.numpy().copy()
        ref[f"{name}.tokens"] = decode(model, pre, GREEDY_TOKENS, pad_id=pad_id).numpy()
    pos = positions(mask)
    for i, (k, v) in enumerate(predict_kv(base, aux, predictor, ids[:, :-1], mask[:, :-1], pos[:, :-1])):
        ref[f"kvp.present.{i}.key"], ref[f"kvp.present.{i}.value"] = k.numpy(), v.numpy()
    return ref


def save_reference(folder: Path, ref: dict) -> Path:
    path = folder / REFERENCE
    np.savez(path, **ref)
    return path
