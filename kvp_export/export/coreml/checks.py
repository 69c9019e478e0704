"""Checks made at export time on Linux, where no Core ML runtime exists.

- numeric: the PyTorch modules that are converted (stateful.py) against the HF path
  (runtime/kvp.py: aux + predictor + exact sink + base), on a real prompt right-padded
  into an exported length, for the prefill and teacher-forced decode steps; run in
  float32 (the conversion's source) and in float16 (PyTorch on the CPU, a stand-in for
  Core ML's fp16 compute that catches overflow and lost precision before a Mac sees it);
- weights: every weight read back from a saved package (decompressed) against the tensor
  of the module it came from, relative Frobenius error, within a per-compression bound.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from kvp_validate import mlpackage

from ...runtime.decode import decode as hf_decode
from ...runtime.kvp import prefill_kvp, score_continuation

# Relative error of logits (max |diff| / max |reference|) allowed in the numeric check.
LOGITS_TOL = {"float32": 1e-4, "float16": 5e-2}
# Relative Frobenius error of a weight read back, per compression (measured well inside these).
WEIGHT_TOL = {"fp16": 1e-3, "int8": 0.05, "int4": 0.25, "palettize4": 0.25}


@torch.no_grad()
def reference(base, aux, predictor, sink_len: int, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF path: greedy tokens [1, steps] and the logits [steps, V] of the prefill and each decode step."""
    tokens = hf_decode(base, prefill_kvp(base, aux, predictor, ids, sink_len=sink_len), steps, pad_id=0)
    logits = score_continuation(base, prefill_kvp(base, aux, predictor, ids, sink_len=sink_len), tokens)
    return tokens, logits[0].float()


@torch.no_grad()
def run_modules(prefill, decode, stateful: bool, ids: torch.Tensor, bucket: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [steps, V] of the converted modules: prefill of ids padded to `bucket`, then decode of tokens[:-1]."""
    n = ids.shape[1]
    x = torch.zeros(1, bucket, dtype=torch.int32)
    x[0, :n] = ids[0]
    last = torch.tensor([n - 1], dtype=torch.int32)
    dtype = decode.base.lm_head.weight.dtype
    if stateful:
        prefill.key_cache.zero_()
        prefill.value_cache.zero_()
        out = [prefill(x, last)]
        decode.key_cache.copy_(prefill.key_cache)
        decode.value_cache.copy_(prefill.value_cache)
    else:
        logits, k, v = prefill(x, last)
        out = [logits]
        shape = list(k.shape)
        shape[3] = decode.base.slots.shape[0]
        kc, vc = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        kc[:, :, :, :bucket], vc[:, :, :, :bucket] = k, v
    for t in range(tokens.shape[1] - 1):
        tok = tokens[:, t : t + 1].int()
        pos = torch.tensor([n + t], dtype=torch.int32)
        if stateful:
            out.append(decode(tok, pos))
        else:
            logits, nk, nv = decode(tok, pos, kc, vc)
            kc[:, :, :, n + t : n + t + 1], vc[:, :, :, n + t : n + t + 1] = nk, nv
            out.append(logits)
    return torch.cat(out).float()


def compare(got: torch.Tensor, ref: torch.Tensor, tol: float) -> dict:
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item() if torch.isfinite(got).all() else float("inf")
    agree = (got.argmax(-1) == ref.argmax(-1)).float()
    return {"max_abs_diff": diff, "rel": diff / scale, "tolerance": tol, "top1_prefill": bool(agree[0]),
            "top1_agreement": agree.mean().item(), "ok": diff / scale <= tol}


def numeric_check(prefill, decode, stateful: bool, ids: torch.Tensor, bucket: int, tokens: torch.Tensor,
                  ref: torch.Tensor) -> dict:
    """The converted modules against the HF path's tokens and logits (`reference`), in float32 and emulated float16."""
    out = {"prompt_tokens": ids.shape[1], "padded_to": bucket, "decode_steps": tokens.shape[1] - 1}
    out["float32"] = compare(run_modules(prefill, decode, stateful, ids, bucket, tokens), ref, LOGITS_TOL["float32"])
    half = [copy.deepcopy(m).half() for m in (prefill, decode)]
    out["float16"] = compare(run_modules(*half, stateful, ids, bucket, tokens), ref, LOGITS_TOL["float16"])
    out["ok"] = out["float32"]["ok"] and out["float16"]["ok"]
    return out


def sources(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A module's parameters and constant buffers by the name coremltools derives from them."""
    named = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    return {k.replace(".", "_"): v.detach().float().numpy() for k, v in named.items() if v.numel() >= 2048}


def _source_of(name: str, src: dict[str, np.ndarray]) -> np.ndarray | None:
    """The source tensor whose derived name is the longest prefix of a package weight's name."""
    best = max((k for k in src if name == k or name.startswith(k + "_")), key=len, default=None)
    return None if best is None else src[best]


def weights_check(programs: dict, modules: dict[str, torch.nn.Module], compression: str) -> dict:
    """Weights read back from saved packages vs their source tensors.

    programs: {role: the package's MIL program (kvp_validate.mlpackage.program)}; in a
    multifunction package (role "kvp") the functions are named after the modules, a
    single-function package's role names its module."""
    errors: dict[str, float] = {}
    unmatched: list[str] = []
    src = {name: sources(m) for name, m in modules.items()}
    for role, prog in programs.items():
        for key, w in mlpackage.weights(prog).items():
            function, name = key.split("/", 1)
            s = _source_of(name, src[role if function == "main" else function])
            label = f"{role}/{name}" if function == "main" else key
            if s is None and not w.any():
                continue  # a zero bias the converter adds to a linear that has none
            if s is None or s.shape != w.shape:
                unmatched.append(label)
                continue
            errors[label] = float(np.linalg.norm(w - s) / max(np.linalg.norm(s), 1e-12))
    tol = WEIGHT_TOL[compression]
    worst = max(errors, key=errors.get) if errors else None
    return {"compared": len(errors), "unmatched": unmatched, "max_rel": errors.get(worst, 0.0), "worst": worst,
            "median_rel": float(np.median(list(errors.values()))) if errors else 0.0, "tolerance": tol,
            "ok": bool(errors) and not unmatched and errors[worst] <= tol}
