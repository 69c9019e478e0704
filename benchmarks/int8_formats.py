"""int8 formats across CPUs: build candidate int8 variants of an ONNX export and measure them.

    python benchmarks/int8_formats.py build EXPORT SCRATCH     # writes SCRATCH: EXPORT + candidate variants
    python benchmarks/int8_formats.py measure SCRATCH OUT.json [--ttft] [--pairs N] [--reference-only]

`build` quantizes EXPORT's fp32 graphs with each candidate (see CANDIDATES) into a copy of the
export whose manifest lists them as extra variants. `measure` runs the validator's parity
(each variant against the fp32 graphs: KL, top-1, NLL delta; and the errors against the
PyTorch reference) and, with --ttft, the TTFT of base / KVP at 1x128 and 1x512, and writes
the results with the machine's CPU model and ISA flags. Run `measure` on each CPU kind (for an
AVX2-only kind on an AVX-512 host: `qemu-x86_64 -cpu Haswell python ...`, numerics only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvp_validate.contract import MANIFEST

# name -> (method, options) for kvp_export.export.quantize
CANDIDATES = {
    "int8_u8s8": ("dynamic", {"reduce_range": False}),       # onnxruntime's default dynamic int8
    "int8_u8s8_rr": ("dynamic", {"reduce_range": True}),     # 7-bit weights: no int16 saturation on AVX2
    "int8_u8u8": ("dynamic", {"reduce_range": False, "weight_type": "uint8"}),  # exact 16-bit products on AVX2
    "int8_nbits_acc4": ("weight-only", {"accuracy_level": 4}),  # MatMulNBits 8-bit, int8 compute
    "int8_nbits_acc0": ("weight-only", {"accuracy_level": 0}),  # MatMulNBits 8-bit, fp32 compute
}


def build(export: Path, scratch: Path) -> None:
    from kvp_export.export.graph_jobs import graph_files
    from kvp_export.export.onnx_export import copy_model_files
    from kvp_export.export.quantize import quantize_dynamic_int8, quantize_nbits
    from kvp_export.export.to_onnx import GRAPHS
    from kvp_export.models.adapters import family

    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(export, scratch, ignore=shutil.ignore_patterns("int8", "int4"))
    manifest = json.loads((scratch / MANIFEST).read_text())
    for name, (method, opts) in CANDIDATES.items():
        (scratch / name).mkdir()
        for g in GRAPHS:
            src, dst = scratch / "fp32" / f"{g}.onnx", scratch / name / f"{g}.onnx"
            if method == "dynamic":
                quantize_dynamic_int8(src, dst, family(manifest["model"]["model_type"]).int8_keep_fp32, **opts)
            else:
                quantize_nbits(src, dst, 8, 128, opts["accuracy_level"], "rtn")
        copy_model_files(scratch / "fp32", scratch / "tokenizer", scratch / name)
        manifest["variants"][name] = {g: graph_files(scratch, name, g) for g in GRAPHS}
        print("built", name, flush=True)
    manifest["variants"] = {k: v for k, v in manifest["variants"].items() if k not in ("int8", "int4")}
    (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))


def measure(scratch: Path, out: Path, ttft: bool, pairs: int, reference_only: bool, variants: list[str]) -> None:
    from kvp_validate.artifact import OnnxArtifact
    from kvp_validate.machine import machine
    from kvp_validate.parity import reference_checks, run_parity
    from kvp_validate.ttft import run_ttft

    art = OnnxArtifact.open(scratch)
    fp32 = run_parity(art, "fp32", 2)
    res = {"machine": machine(), "fp32": {f"{c['graph']}.{c['metric']}": c["value"] for c in fp32["checks"]},
           "fp32_ok": fp32["ok"], "variants": {}}
    print("fp32", json.dumps(res["fp32"]), flush=True)
    for name in variants:
        checks = (reference_checks(art, name, 2) if reference_only
                  else run_parity(art, name, 2, fp32=fp32, n_pairs=pairs)["checks"])
        row = {f"{c['graph']}.{c['metric']}": c["value"] for c in checks}
        if ttft:
            t = run_ttft(art, name, lengths=(128, 512), batches=(1,), repeats=5)
            row |= {f"ttft.1x{pt['prompt_len']}.{k}": pt["ms"][k] for pt in t["points"] for k in ("base", "kvp")}
        res["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    if ttft:
        t = run_ttft(art, "fp32", lengths=(128, 512), batches=(1,), repeats=5)
        res["fp32_ttft"] = {f"1x{pt['prompt_len']}.{k}": pt["ms"][k] for pt in t["points"] for k in ("base", "kvp")}
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["build", "measure"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--ttft", action="store_true")
    ap.add_argument("--reference-only", action="store_true", help="only the errors against PyTorch (fast)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--variants", default=",".join(CANDIDATES))
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.src, a.dst)
    else:
        measure(a.src, a.dst, a.ttft, a.pairs, a.reference_only, a.variants.split(","))
