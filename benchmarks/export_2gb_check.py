#!/usr/bin/env python3
"""Does the export's per-graph work handle an fp32 graph over protobuf's 2 GB limit?

A one-off check (peak RSS about 7.4 GB, 4.5 GB of disk under WORK; not a CI test), for models like
qwen2.5-coder-0.5b whose fp32 base graphs reach that size (BENCHMARKS.md, "Issue 11 on a GPU").
A synthetic graph: x [1, S, 1024] -> 4 MatMuls with 1024 x 135000 fp32 weights (2.21 GB in all,
in a side file). It runs, one after the other, what export/graph_jobs.py runs per graph: the
checker, graph_flops, the fp32 variant (hashes, onnxruntime's optimised copy) and the int8 variant
(dynamic quantization, checker, hashes, optimised copy), then loads every written graph in
onnxruntime and runs it.

  python benchmarks/export_2gb_check.py WORK
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kvp_export.export import graph_flops
from kvp_export.export.graph_jobs import variant_graph
from kvp_export.export.to_onnx import check_graph

K, N = 1024, 135000
NAMES = ["/model/layers.0/self_attn/q_proj/MatMul", "/model/layers.0/mlp/up_proj/MatMul",
         "/model/layers.1/mlp/up_proj/MatMul", "/lm_head/MatMul"]


def write_graph(src: Path) -> None:
    nodes, inits, outs = [], [], []
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        inits.append(numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=name))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "S", N]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K])
    model = helper.make_model(helper.make_graph(nodes, "big", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=src.name + ".data", size_threshold=1024)


def step(name: str, fn) -> None:
    t0 = time.time()
    result = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{name}: ok in {time.time() - t0:.0f} s, peak RSS {peak:.2f} GB -> {result}", flush=True)


def main() -> None:
    root = Path(sys.argv[1])
    (root / "fp32").mkdir(parents=True, exist_ok=True)
    src = root / "fp32" / "g.onnx"
    step("write", lambda: write_graph(src) or f"{sum(p.stat().st_size for p in src.parent.iterdir()) / 1e9:.2f} GB")
    feeds = [{"x": np.ones((1, s, K), np.float32)} for s in (8, 16)]
    q = {"block_size": 32, "accuracy_level": 4, "int8_method": "dynamic", "int4_method": "hqq"}
    step("check_graph fp32", lambda: check_graph(src))
    step("graph_flops", lambda: graph_flops.matmul_flops(src, feeds))
    step("fp32 variant", lambda: variant_graph(root, "fp32", "g", q)["optimized"]["files_bytes"])
    step("int8 variant", lambda: variant_graph(root, "int8", "g", q)["files"]["bytes"])
    for v in ("fp32", "int8"):
        for path in (root / v / "g.onnx", root / "optimized" / v / "g.onnx"):
            y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y1"], feeds[0])[0]
            print(f"{path.relative_to(root)} runs: y1 {y.shape}, mean |y1| {float(np.abs(y).mean()):.4f}", flush=True)


if __name__ == "__main__":
    main()
