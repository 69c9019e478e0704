"""Deliberately broken copies of an export, to show that parity fails them on this machine.

Parity limits are only worth something if a broken graph fails them on every CPU where a
correct graph passes. `break_export` writes a copy of an export whose graphs of one variant
carry one of these faults (ONNX surgery, no torch):
- "zero_layer": every weight of one base decoder layer set to zero (a lost or mangled tensor);
- "swap_kv": kvp_prefill's predicted keys and values exchanged (a wiring error);
- "rope_base": the rotary frequencies of every graph computed with another RoPE base (a wrong
  config, e.g. rope_theta falling back to 10000);
and refreshes the manifest's hashes and sizes (its `files` too) so that only parity can tell.
`kvp validate --check parity` on the copy must fail (tests/test_export_onnx.py does this on a
tiny model; benchmarks/int8_formats.py on the real one, on each CPU kind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .artifact import MANIFEST, sha256_file
from .errors import KvpError, check_choice
from .integrity import file_records
from .runtime import OPTIMIZED_DIR

FAULTS = ("zero_layer", "swap_kv", "rope_base")


def _weights_of_layer(model: onnx.ModelProto, layer: int) -> set[str]:
    """Initializers (>= 2-D: weights, not scales) read by the nodes of decoder layer `layer`."""
    inits = {i.name: i for i in model.graph.initializer}
    tag = f"layers.{layer}/"
    names = set()
    for node in model.graph.node:
        if tag in node.name:
            names |= {x for x in node.input if x in inits and len(inits[x].dims) >= 2}
    return names


def zero_layer(model: onnx.ModelProto, layer: int = 1) -> int:
    names = _weights_of_layer(model, layer)
    for init in model.graph.initializer:
        if init.name in names:
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(arr), init.name))
    return len(names)


def swap_kv(model: onnx.ModelProto) -> int:
    """Exchange every present.i.key / present.i.value pair: each output now carries the other's
    tensor (renamed at its producer, passed on by an Identity, so declared shapes still hold)."""
    outs = {o.name for o in model.graph.output}
    pairs = [(n, n.replace(".key", ".value")) for n in outs if n.startswith("present.") and n.endswith(".key")]
    swap = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    for node in model.graph.node:
        node.output[:] = [f"{o}__swapped" if o in swap else o for o in node.output]
        node.input[:] = [f"{i}__swapped" if i in swap else i for i in node.input]
    for name, other in swap.items():
        model.graph.node.append(onnx.helper.make_node("Identity", [f"{other}__swapped"], [name]))
    declared = {o.name: o for o in model.graph.output}
    for key, value in pairs:  # keys and values have one shape: declare it fully on both
        declared[key].type.CopyFrom(declared[value].type)
    return len(pairs)


def _looks_like_inv_freq(arr: np.ndarray) -> bool:
    """A RoPE frequency table: 1, base^(-2/d), base^(-4/d), ... (any shape with one long axis)."""
    if sum(d > 1 for d in arr.shape) != 1:
        return False
    arr = arr.ravel()
    return (arr.dtype.kind == "f" and 4 <= arr.size <= 1024 and bool(np.isclose(arr[0], 1.0))
            and bool(np.all(np.diff(arr) < 0)) and bool(arr[-1] > 0))


def rope_base(model: onnx.ModelProto) -> int:
    """Recompute every RoPE frequency table (1, base^-2/d, ...) with a base 10x smaller."""
    count = 0
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        arr = numpy_helper.to_array(t)
        if _looks_like_inv_freq(arr):
            flat = arr.ravel().astype(np.float64)
            d = 2 * flat.size
            base = flat[1] ** (-d / 2.0)  # flat[k] = base^(-2k/d)
            new = (base / 10.0) ** (-2.0 * np.arange(flat.size) / d)
            t.CopyFrom(numpy_helper.from_array(new.astype(arr.dtype).reshape(arr.shape), t.name))
            count += 1
    return count


def break_export(src: str | Path, dst: str | Path, variant: str, fault: str) -> Path:
    """Copy export `src` to `dst` with `fault` in `variant`'s graphs; return `dst`."""
    check_choice("fault", fault, FAULTS)
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest.pop("optimized", None)  # the runtime must load the broken source graphs
    shutil.rmtree(dst / OPTIMIZED_DIR, ignore_errors=True)
    changed = 0
    for name in manifest["variants"][variant]:
        if fault == "swap_kv" and name != "kvp_prefill":
            continue
        if fault == "zero_layer" and not name.startswith("base"):
            continue
        path = dst / variant / f"{name}.onnx"
        model = onnx.load(str(path))
        n = {"zero_layer": zero_layer, "swap_kv": swap_kv, "rope_base": rope_base}[fault](model)
        if n:
            onnx.save(model, str(path))
            entry = manifest["variants"][variant][name]
            entry["sha256"] = {path.name: sha256_file(path)}
            entry["bytes"] = path.stat().st_size
            changed += n
    if not changed:
        raise KvpError(f"fault {fault} found nothing to change in {variant}")
    manifest["files"] = file_records(dst)  # re-listed: the copy passes every integrity check
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return dst
