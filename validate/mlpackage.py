"""What can be read from a Core ML package on any OS: its interface, ops, weights, and a Neural Engine lint.

coremltools loads a package's spec and program without the Core ML runtime (macOS only),
so everything here runs on Linux. No torch: coremltools imports it only where installed.

The lint is static and heuristic: which ops the Neural Engine runs is decided by Core ML
at load time, per device; `MLComputePlan` on a Mac (validate/coreml.py) is the
authority. The rules flag what is known to keep work off it: float32 compute (the ANE
computes in fp16), integer arithmetic, ranged or unbounded shapes, op types that are
commonly placed on the CPU, very wide layers, and the cache state's size and dtype.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np

from .errors import KvpError

# Op types that Core ML commonly places off the Neural Engine (community reports, e.g. Apple's
# ml-ane-transformers notes and ANEMLL; MLComputePlan is authoritative).
CPU_OPS = frozenset({"gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
                     "cumsum", "topk", "argsort", "non_zero", "while_loop", "cond", "range_1d", "einsum",
                     "random_uniform", "random_normal", "random_bernoulli", "random_categorical"})
WIDE_CHANNELS = 16384  # output channels above this: the LM head (ANEMLL splits it for the ANE)


@cache
def coremltools():
    """coremltools, imported once and quietly (on Linux it logs that its runtime is missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        try:
            import coremltools as ct
        except ImportError:
            raise KvpError("Core ML checks need coremltools: pip install 'kvp-validate[coreml]' "
                           "(or kvp-export[coreml])") from None
    return ct


def open_package(path: str | Path):
    """An MLModel for reading (never compiled or loaded into the runtime)."""
    path = Path(path)
    if not path.is_dir():
        raise KvpError(f"missing Core ML package {path}")
    ct = coremltools()
    try:
        return ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:  # noqa: BLE001 - a corrupt package is the user's file
        raise KvpError(f"cannot read Core ML package {path}: {str(e).splitlines()[0]}") from None


def program(path: str | Path):
    """The package's MIL program, every function, with weights (coremltools' own loader)."""
    model = open_package(path)
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = model.get_spec()
    return milproto.load(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=model.weights_dir)


def _dtype(proto_dtype) -> str:
    ct = coremltools()
    names = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    return {"FLOAT16": "fp16", "FLOAT32": "fp32", "DOUBLE": "fp64", "INT32": "int32", "INT8": "int8"}.get(
        names.Name(proto_dtype), names.Name(proto_dtype).lower())


def _feature(f) -> dict:
    kind = f.type.WhichOneof("Type")
    arr = f.type.stateType.arrayType if kind == "stateType" else f.type.multiArrayType
    out = {"name": f.name, "dtype": _dtype(arr.dataType), "shape": [int(d) for d in arr.shape]}
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        out["enumerated"] = [[int(d) for d in s.shape] for s in arr.enumeratedShapes.shapes]
    elif flex == "shapeRange":
        out["ranges"] = [[int(r.lowerBound), int(r.upperBound)] for r in arr.shapeRange.sizeRanges]
    return out


def interface(path: str | Path) -> dict:
    """Per function: inputs, outputs and states (name, dtype, shape, enumerated shapes or ranges)."""
    spec = open_package(path).get_spec()
    desc = spec.description
    funcs = desc.functions or [desc]
    out = {"spec_version": int(spec.specificationVersion), "default_function": desc.defaultFunctionName or "main",
           "functions": {}}
    for f in funcs:
        out["functions"][getattr(f, "name", "") or "main"] = {
            "inputs": [_feature(i) for i in f.input],
            "outputs": [_feature(o) for o in f.output],
            "states": [_feature(s) for s in f.state],
        }
    return out


def _type(var) -> tuple[str, tuple]:
    from coremltools.converters.mil.mil import types

    t = var.sym_type
    if types.is_tensor(t):
        return types.builtin_to_string(t.get_primitive()), tuple(var.shape)
    return types.builtin_to_string(t) if t is not None else "?", ()


def ops(prog) -> dict[str, dict[str, int]]:
    """Op inventory per function (const and constexpr ops included: they are the weights)."""
    return {name: dict(sorted(Counter(op.op_type for op in f.operations).items()))
            for name, f in prog.functions.items()}


def weights(prog, threshold: int = 2048) -> dict[str, np.ndarray]:
    """The dense weights every compute op reads, decompressed (constexpr ops materialised), float32.

    Keyed by the name of the value the compute op reads; a weight shared by several functions
    appears once per function, prefixed by it (`function/name`)."""
    out: dict[str, np.ndarray] = {}
    for fname, f in prog.functions.items():
        for op in f.operations:
            if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
                continue
            var = op.outputs[0]
            if all(c.op_type.startswith("constexpr_") for c in var.child_ops):
                continue  # an input of a decompression op, not a weight itself
            val = op.materialized_val_inference() if op.op_type.startswith("constexpr_") else op.val.val
            if isinstance(val, np.ndarray) and val.size >= threshold and val.dtype.kind == "f":
                out[f"{fname}/{var.name}"] = val.astype(np.float32)
    return out


def lint(prog, iface: dict) -> list[dict]:
    """Neural Engine readiness findings: [{rule, severity (warn|info), function, detail}]."""
    found: list[dict] = []

    def add(rule, severity, function, detail):
        found.append({"rule": rule, "severity": severity, "function": function, "detail": detail})

    for fname, f in prog.functions.items():
        fp32, ints, cpu, wide = Counter(), Counter(), Counter(), []
        for op in f.operations:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                continue
            if op.op_type in CPU_OPS:
                cpu[op.op_type] += 1
            for v in op.outputs:
                dtype, shape = _type(v)
                if dtype == "fp32":
                    fp32[op.op_type] += 1
                elif dtype.startswith(("int", "uint")) and op.op_type not in ("shape",):
                    ints[op.op_type] += 1
            if op.op_type in ("linear", "matmul", "conv"):
                dtype, shape = _type(op.outputs[0])
                if shape and isinstance(shape[-1], int) and shape[-1] > WIDE_CHANNELS:
                    wide.append(f"{op.op_type} {op.name} -> {shape[-1]} channels")
        if fp32:
            add("fp32-compute", "warn", fname, f"{sum(fp32.values())} ops compute in float32 (the ANE runs fp16 only): "
                + _top(fp32))
        if ints:
            add("integer-ops", "info", fname, f"{sum(ints.values())} ops on integers (index arithmetic, on the CPU): "
                + _top(ints))
        if cpu:
            add("cpu-ops", "info", fname, "op types commonly placed off the ANE: " + _top(cpu))
        for w in wide:
            add("wide-layer", "warn", fname, w + f" (> {WIDE_CHANNELS}; may be split or leave the ANE)")
    for fname, f in iface["functions"].items():
        for x in f["inputs"]:
            if "ranges" in x or any(d <= 0 for d in x["shape"]):
                add("dynamic-shape", "warn", fname, f"input {x['name']} has a ranged shape: the ANE needs static "
                    "or enumerated shapes")
            elif "enumerated" in x:
                add("enumerated-shape", "info", fname, f"input {x['name']}: {len(x['enumerated'])} enumerated shapes "
                    f"({', '.join('x'.join(map(str, s)) for s in x['enumerated'])}), each compiled on its own")
            if x["shape"] and x["shape"][0] != 1:
                add("batch", "info", fname, f"input {x['name']} has batch {x['shape'][0]} (batch 1 suits the ANE)")
        for s in f["states"]:
            nbytes = int(np.prod(s["shape"])) * (2 if s["dtype"] == "fp16" else 4)
            add("state-size", "warn" if s["dtype"] != "fp16" else "info", fname,
                f"state {s['name']} {s['dtype']} {'x'.join(map(str, s['shape']))}: {nbytes / 2**20:.1f} MiB")
    return found


def _top(counter: Counter, n: int = 6) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counter.most_common(n))


def package_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
