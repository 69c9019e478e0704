"""MatMulNBits with float zero points, rewritten so that onnxruntime runs its fast integer kernels.

HQQ optimises a float zero point per block. onnxruntime's CPU MatMulNBits kernels (the prepacked
int4 x fp32 and int4 x int8 paths) take only integer zero points; with float ones it dequantizes
the whole weight to fp32 on every call, which made the HQQ int4 decode step several times slower
than fp32 (BENCHMARKS.md, "int4 that pays off"). Rounding the zero points to integers is not an
option for GGUF-sourced models: their weights are already 4-bit with a float minimum per block of
32 (Q4_1, Q4_K), which HQQ recovers almost exactly and an integer zero point cannot.

So each such node is split, exactly, into the integer part and a per-block offset:
    W[k, n] = s[n, b] * (q[k, n] - z[n, b])                          (b: the block of k)
            = s[n, b] * (q[k, n] - m) + s[n, b] * (m - z[n, b])          (m = 2^(bits-1))
    x @ W  = MatMulNBits(x, q, s) + blocksum(x) @ C,   C[b, n] = s[n, b] * (m - z[n, b])
MatMulNBits without a zero-point input uses m, the kernels' default. blocksum(x) sums x over each
block of K (shared by the nodes reading the same input), and C is a small fp32 matrix
(K / block_size rows): about 1/block_size of the weight's multiply-adds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def split_float_zero_points(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every MatMulNBits of the main graph whose zero points are a float
    initializer; return how many were rewritten."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, sums, dropped, count = [], {}, set(), 0
    for node in g.node:
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) == 4 else None
        if zp is None or zp.data_type == TensorProto.UINT8:
            nodes.append(node)
            continue
        a = _attrs(node)
        n, k, bs, bits = a["N"], a["K"], a["block_size"], a["bits"]
        blocks = -(-k // bs)
        z = numpy_helper.to_array(zp).astype(np.float64).reshape(n, blocks)
        s = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(n, blocks)
        offset = (s * (2 ** (bits - 1) - z)).T.astype(np.float32)  # [blocks, N]
        x, y = node.input[0], node.output[0]
        dropped.add(node.input[3])
        count += 1
        del node.input[3:]
        node.output[0] = f"{y}_int"
        nodes.append(node)
        if (x, bs) not in sums:
            sums[(x, bs)] = _block_sum(g, nodes, x, k, bs, node.name)
        c_name = f"{node.input[1]}_offset"
        g.initializer.append(numpy_helper.from_array(offset, c_name))
        nodes += [
            helper.make_node("MatMul", [sums[(x, bs)], c_name], [f"{y}_off_flat"], name=f"{node.name}_offset"),
            helper.make_node("Shape", [f"{y}_int"], [f"{y}_shape"], name=f"{node.name}_shape"),
            helper.make_node("Reshape", [f"{y}_off_flat", f"{y}_shape"], [f"{y}_off"], name=f"{node.name}_off"),
            helper.make_node("Add", [f"{y}_int", f"{y}_off"], [y], name=f"{node.name}_add"),
        ]
    del g.node[:]
    g.node.extend(nodes)
    kept = [i for i in g.initializer if i.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(kept)
    return count


def _block_sum(g: onnx.GraphProto, nodes: list, x: str, k: int, bs: int, name: str) -> str:
    """Nodes summing `x` [..., K] over each block of `bs` along K: [rows, K / bs] (rows = all
    leading dimensions flattened; K is padded with zeros to whole blocks, as the kernels do)."""
    blocks = -(-k // bs)
    out, shape, axes = f"{x}_blocksum{bs}", f"{x}_blocks{bs}_shape", f"{x}_blocks{bs}_axes"
    g.initializer.extend([numpy_helper.from_array(np.array([-1, blocks, bs], np.int64), shape),
                          numpy_helper.from_array(np.array([-1], np.int64), axes)])
    src = x
    if k % bs:
        pads = f"{x}_blocks{bs}_pads"
        g.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, blocks * bs - k], np.int64), pads))
        flat = f"{x}_blocks{bs}_flat"
        g.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), flat))
        nodes += [helper.make_node("Reshape", [x, flat], [f"{flat}_out"], name=f"{name}_flatten"),
                  helper.make_node("Pad", [f"{flat}_out", pads], [f"{x}_padded{bs}"], name=f"{name}_pad")]
        src = f"{x}_padded{bs}"
    nodes += [helper.make_node("Reshape", [src, shape], [f"{x}_blocks{bs}"], name=f"{name}_blocks"),
              helper.make_node("ReduceSum", [f"{x}_blocks{bs}", axes], [out], keepdims=0, name=f"{name}_blocksum")]
    return out
