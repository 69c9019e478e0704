"""FLOPs of the graphs as exported, counted from the graphs themselves.

Every MatMul / Gemm is counted (2 FLOPs per multiply-add) with the shapes onnxruntime
actually sees: the graph is run once with the inputs of each MatMul exposed as outputs.
FLOPs are a polynomial in the sequence length (linear layers ~ S, attention ~ S^2) and
linear in the batch, so counting a few lengths at batch 1 gives exact coefficients that
the validator evaluates at any (batch, length) without onnx or torch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

MATMULS = ("MatMul", "Gemm")


def _instrumented(path: Path, out: Path) -> tuple[list[tuple[str, str]], dict[str, tuple[int, ...]]]:
    """Write to `out` the graph at `path` with every MatMul input exposed as an output. Its weights
    go to a side file: in one protobuf a graph over 2 GB cannot be serialised (qwen2.5-coder-0.5b's
    fp32 base graphs are about that size)."""
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    pairs, extra = [], []
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type in MATMULS:
            a, b = node.input[0], node.input[1]
            pairs.append((a, b))
            for name in (a, b):
                if name not in inits and name not in outputs and name not in extra:
                    extra.append(name)
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return pairs, inits


def matmul_flops(path: Path, feeds_list: list[dict[str, np.ndarray]]) -> list[int]:
    """FLOPs of the graph's MatMul/Gemm nodes for each feed dict."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # beside the graph: the disk that holds it
        pairs, inits = _instrumented(path, Path(tmp) / "instrumented.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the nodes as exported
        opts.log_severity_level = 3  # not the warning that an input has a default (logits_to_keep)
        sess = ort.InferenceSession(str(Path(tmp) / "instrumented.onnx"), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        out = []
        for feeds in feeds_list:
            shapes = {n: v.shape for n, v in zip(names, sess.run(None, feeds))} | inits
            total = 0
            for a, b in pairs:
                sa, sb = shapes[a], shapes[b]
                batch = int(np.prod(np.broadcast_shapes(sa[:-2], sb[:-2]))) if len(sa) > 2 or len(sb) > 2 else 1
                total += 2 * batch * sa[-2] * sa[-1] * sb[-1]
            out.append(int(total))
    return out


def fit_poly(xs: list[int], ys: list[int]) -> list[float]:
    """Exact polynomial coefficients (lowest degree first) through len(xs) points."""
    coef = np.linalg.solve(np.vander(np.asarray(xs, dtype=np.float64), increasing=True), np.asarray(ys, np.float64))
    return [float(round(c, 3)) for c in coef]

