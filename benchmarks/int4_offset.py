"""The per-block offset of zero_points.py at M rows: MatMulNBits alone, with the offset as written,
and with the offset as one Gemm, against an fp32 MatMul (one node, M x K -> N, 4-bit blocks of 32).

Usage: python benchmarks/int4_offset.py M K N [ROUNDS]. BENCHMARKS.md, "Issue 12, second session"."""

import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from variant_table import interleaved, repeated  # the shared interleaved timing (this folder)

from kvp_export.export.zero_points import split_float_zero_points
from kvp_validate.runtime import session_options

M, K, N, BS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 32
rng = np.random.default_rng(0)
blocks = K // BS


def model(nodes, inits):
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, M, K])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, M, N])],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])


def sess(m):
    return ort.InferenceSession(m.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])  # the runtime's


q = rng.integers(0, 256, (N, blocks, BS // 2), dtype=np.uint8)
s = (rng.random((N * blocks,)) * 0.01).astype(np.float32)
zf = (rng.random((N * blocks,)) * 15).astype(np.float32)
attrs = dict(K=K, N=N, bits=4, block_size=BS, accuracy_level=4)
plain = model(
    [h.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", name="mm", **attrs)],
    [nh.from_array(q, "q"), nh.from_array(s, "s")],
)
split = model(
    [h.make_node("MatMulNBits", ["x", "q", "s", "z"], ["y"], domain="com.microsoft", name="mm", **attrs)],
    [nh.from_array(q, "q"), nh.from_array(s, "s"), nh.from_array(zf, "z")],
)
split_float_zero_points(split)
W = rng.standard_normal((K, N)).astype(np.float32)
cases = {
    "fp32": sess(model([h.make_node("MatMul", ["x", "W"], ["y"])], [nh.from_array(W, "W")])),
    "nbits": sess(plain),
    "nbits+offset": sess(split),
}
x = rng.standard_normal((1, M, K)).astype(np.float32)
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 15
med = interleaved({k: repeated(lambda se=se: se.run(None, {"x": x})) for k, se in cases.items()}, ROUNDS)
print(
    f"M={M} K={K} N={N} b32 level 4: fp32 / variant: " + ", ".join(f"{k} {med['fp32'] / v:.2f}" for k, v in med.items())
)
# the Gemm form: MatMul + Reshape + Add -> Reshape(y_int to 2-D) + Gemm(blocksum, C, y_int_2d) + Reshape back
g = split.graph
nodes = list(g.node)
mm_off = next(n for n in nodes if n.op_type == "MatMul")
add = next(n for n in nodes if n.op_type == "Add")
resh = next(n for n in nodes if n.op_type == "Reshape" and n.output[0] == add.input[1])
shape = next(n for n in nodes if n.op_type == "Shape")
g.initializer.append(nh.from_array(np.array([-1, N], np.int64), "flatN"))
new = [n for n in nodes if n not in (mm_off, add, resh)]
y_int = add.input[0]
new += [
    h.make_node("Reshape", [y_int, "flatN"], ["y2d"]),
    h.make_node("Gemm", [mm_off.input[0], mm_off.input[1], "y2d"], ["g2d"]),
    h.make_node("Reshape", ["g2d", shape.output[0]], [add.output[0]]),
]
del g.node[:]
g.node.extend(new)
cases2 = {"nbits+offset": cases["nbits+offset"], "nbits+gemm offset": sess(split)}
a = cases2["nbits+offset"].run(None, {"x": x})[0]
bb = cases2["nbits+gemm offset"].run(None, {"x": x})[0]
med = interleaved({k: repeated(lambda se=se: se.run(None, {"x": x})) for k, se in cases2.items()}, ROUNDS)
print(
    f"  same output: {np.abs(a - bb).max() / np.abs(a).max():.1e}; offset / gemm offset: "
    f"{med['nbits+offset'] / med['nbits+gemm offset']:.2f}"
)
