"""Tracing the modules of stateful.py and converting them to Core ML ML Programs.

jit.trace, not torch.export: under torch 2.13 coremltools 9.0's torch.export path needs a
converter registered for aten.alias, and tracing is the path Apple documents for stateful
models (docs/architecture.md, "Stack facts that shaped the code"). The modules take every
position as a tensor, so nothing but the enumerated prompt length depends on the traced
example.

Targets:
- ios18: one multifunction package, `prefill` and `decode` (the default) sharing weights
  and the two cache states (save_multifunction deduplicates identical weights by hash; a
  state made by either function is valid for the other: same names, shapes, dtypes);
- ios17: no states, no multifunction: two packages with the cache as inputs/outputs.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import ct
from .stateful import build, cache_shape

TARGETS = ("ios18", "ios17")
PACKAGE = {"ios18": {"kvp": "kvp.mlpackage"},
           "ios17": {"prefill": "kvp_prefill.mlpackage", "decode": "kvp_decode.mlpackage"}}


@dataclass(frozen=True)
class Shapes:
    context: int
    prompt_lengths: tuple[int, ...]
    cache: tuple[int, ...]  # [layers, 1, Hkv, context, D]


def deployment(target: str):
    return {"ios18": ct.target.iOS18, "ios17": ct.target.iOS17}[target]


def _tensor(name: str, shape, dtype=np.int32):
    return ct.TensorType(name=name, shape=shape, dtype=dtype)


def _convert(module, example: tuple, inputs: list, outputs: list[str], target: str, states=None):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings: every size that matters is an input shape
        traced = torch.jit.trace(module, example, check_trace=False)
        return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=n, dtype=np.float16) for n in outputs],
                          states=states or [], minimum_deployment_target=deployment(target),
                          compute_precision=ct.precision.FLOAT16, convert_to="mlprogram", skip_model_load=True)


def prefill_example(shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(shapes.prompt_lengths)
    return torch.zeros(1, n, dtype=torch.int32), torch.tensor([n - 1], dtype=torch.int32)


def convert_models(base, aux, predictor, sink_len: int, shapes: Shapes, target: str) -> dict:
    """{function or package role: MLModel} for one target, in float16, not yet saved."""
    stateful = target == "ios18"
    prefill, decode = build(base, aux, predictor, sink_len, shapes.context, stateful)
    n = shapes.prompt_lengths
    lengths = ct.EnumeratedShapes(shapes=[(1, k) for k in n], default=(1, n[-1])) if len(n) > 1 else (1, n[0])
    pre_in = [_tensor("input_ids", lengths), _tensor("last_index", (1,))]
    dec_in = [_tensor("input_ids", (1, 1)), _tensor("position", (1,))]
    one = (torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    if stateful:
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=shapes.cache, dtype=np.float16), name=n)
                  for n in ("key_cache", "value_cache")]
        return {"prefill": _convert(prefill, prefill_example(shapes), pre_in, ["logits"], target, states),
                "decode": _convert(decode, one, dec_in, ["logits"], target, states)}
    cache = torch.zeros(shapes.cache)
    dec_in += [_tensor("key_cache", shapes.cache, np.float16), _tensor("value_cache", shapes.cache, np.float16)]
    return {"prefill": _convert(prefill, prefill_example(shapes), pre_in, ["logits", "keys", "values"], target),
            "decode": _convert(decode, (*one, cache, cache), dec_in, ["logits", "new_keys", "new_values"], target)}


def save_target(models: dict, target: str, folder: Path) -> dict[str, Path]:
    """Save one target's models into `folder`: {role: package path} (PACKAGE names the files)."""
    folder.mkdir(parents=True, exist_ok=True)
    if target == "ios17":
        paths = {}
        for role, name in PACKAGE[target].items():
            models[role].save(str(folder / name))
            paths[role] = stable_bytes(folder / name)
        return paths
    parts = folder / ".functions"
    parts.mkdir()
    try:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, model in models.items():
            model.save(str(parts / f"{name}.mlpackage"))
            desc.add_function(str(parts / f"{name}.mlpackage"), src_function_name="main", target_function_name=name)
        desc.default_function_name = "decode"
        out = folder / PACKAGE[target]["kvp"]
        ct.utils.save_multifunction(desc, str(out))
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return {"kvp": stable_bytes(out)}


def stable_bytes(package: Path) -> Path:
    """Make a saved package the same bytes whenever the same models are saved: coremltools names
    the package's items by random UUIDs (Manifest.json), here named by their paths (uuid5; Core ML
    looks items up by these ids only within the package), and it serializes the model spec's
    protobuf maps in insertion order, which follows the process's string hashing; the spec is
    written again with sorted maps (protobuf's deterministic serialization, the same message)."""
    path = package / "Manifest.json"
    manifest = json.loads(path.read_text())
    items = manifest["itemInfoEntries"]
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "kvp-export:" + item["path"])) for old, item in items.items()}
    spec_file = package / "Data" / items[manifest["rootModelIdentifier"]]["path"]
    spec = ct.proto.Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    manifest["itemInfoEntries"] = {ids[k]: v for k, v in items.items()}
    manifest["rootModelIdentifier"] = ids[manifest["rootModelIdentifier"]]
    path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    return package


def shapes_for(base, context: int, prompt_lengths: tuple[int, ...]) -> Shapes:
    return Shapes(context, tuple(sorted(prompt_lengths)), cache_shape(base, context))
