"""MatMulNBits (bits, block size, accuracy level) against an fp32 MatMul, one node of M x K -> N.

Usage: python benchmarks/matmulnbits_kernels.py M K N [ROUNDS]. Prints fp32 time / variant time
(variant_table's interleaved rounds: fastest of 5 calls per round, medians). BENCHMARKS.md, "Issue 12,
second session"."""

import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from variant_table import interleaved, repeated  # the shared interleaved timing (this folder)

from kvp_validate.runtime import session_options

M, K, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)


def sess(nodes, inits, extra_opset=True):
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [M, K])],
        [h.make_tensor_value_info("y", T.FLOAT, [M, N])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])  # the runtime's


W = rng.standard_normal((K, N)).astype(np.float32)
cases = {"fp32": sess([h.make_node("MatMul", ["x", "W"], ["y"])], [nh.from_array(W, "W")])}
for bits, bs, lvl in [(4, 32, 4), (4, 32, 0), (4, 128, 4), (8, 32, 4), (8, 32, 0)]:
    blocks = -(-K // bs)
    q = rng.integers(0, 256, (N, blocks, bs * bits // 8), dtype=np.uint8)
    s = (rng.random((N * blocks,)) * 0.01).astype(np.float32)
    node = h.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                       block_size=bs, accuracy_level=lvl)
    cases[f"nbits{bits} b{bs} l{lvl}"] = sess([node], [nh.from_array(q, "q"), nh.from_array(s, "s")])
x = rng.standard_normal((M, K)).astype(np.float32)
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 15
med = interleaved({k: repeated(lambda s=s: s.run(None, {"x": x})) for k, s in cases.items()}, ROUNDS)
print(f"M={M} K={K} N={N}: fp32 time / variant time")
for k, ms in med.items():
    print(f"  {k:18s} {med['fp32'] / ms:.2f}")
