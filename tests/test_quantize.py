"""int4 quantization: HQQ's float zero points split off into a per-block offset (export/zero_points.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kvp_export.export.quantize import quantize_nbits
from kvp_export.export.zero_points import split_float_zero_points


def _matmul_model(k: int, n: int, rank: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    shape = ["b", "s", k] if rank == 3 else ["b", k]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(("k", "rank"), [(96, 3), (80, 2)])  # 80: K not a whole number of blocks
def test_split_zero_points_is_exact_and_leaves_integer_kernels(tmp_path, k, rank):
    src = tmp_path / "fp32.onnx"
    onnx.save(_matmul_model(k, 48, rank), str(src))
    x = np.random.default_rng(1).standard_normal((2, 5, k) if rank == 3 else (3, k)).astype(np.float32)
    # the reference: HQQ's float zero points as onnxruntime runs them (fp32 compute)
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    q.process()
    float_zp = tmp_path / "float_zp.onnx"
    q.model.save_model_to_file(str(float_zp))
    assert split_float_zero_points(q.model.model) == 1
    split = tmp_path / "split.onnx"
    q.model.save_model_to_file(str(split))
    onnx.checker.check_model(str(split), full_check=True)
    np.testing.assert_allclose(_run(split, x), _run(float_zp, x), rtol=1e-4, atol=1e-5)

    # what the exporter writes: no MatMulNBits keeps a zero-point input, outputs as close at fp32 compute
    dst = tmp_path / "int4.onnx"
    quantize_nbits(src, dst, 4, 32, 0, "hqq")
    nodes = [n for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(len(n.input) == 3 for n in nodes)
    np.testing.assert_allclose(_run(dst, x), _run(float_zp, x), rtol=1e-4, atol=1e-5)


def test_integer_zero_points_are_left_alone(tmp_path):
    src = tmp_path / "fp32.onnx"
    onnx.save(_matmul_model(64, 32, 3), str(src))
    dst = tmp_path / "rtn.onnx"
    quantize_nbits(src, dst, 4, 32, 4, "rtn")
    model = onnx.load(str(dst))
    before = [n.SerializeToString() for n in model.graph.node]
    assert split_float_zero_points(model) == 0
    assert [n.SerializeToString() for n in model.graph.node] == before


def test_int4_keeps_the_lm_head_at_8_bits(tmp_path):
    from kvp_export.export.quantize import quantize

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32), (rng.standard_normal((64, 96)) * 0.1).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 96])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/layers.0/mlp/up_proj/MatMul"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    info = quantize("int4", src, tmp_path / "int4.onnx", keep_fp32=(), block_size=32, accuracy_level=4)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node if n.op_type == "MatMulNBits"}
    assert bits == {"/layers.0/mlp/up_proj/MatMul_Q4": 4, "/lm_head/MatMul_Q8": 8}
    assert info["lm_head"]["bits"] == 8


def test_int8_keeps_only_the_family_list_in_fp32(tmp_path):
    """Dynamic int8 leaves in fp32 exactly the MatMuls the given family's adapter names."""
    from kvp_export.export.quantize import quantize
    from kvp_export.models.adapters import ADAPTERS

    names = ["/layers.0/mlp/down_proj/MatMul", "/layers.0/qkv/MatMul", "/layers.0/mlp/up_proj/MatMul"]
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])
    ws = [numpy_helper.from_array((rng.standard_normal((32, 32)) * 0.1).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", [a, f"w{i}"], [b], name=n)
             for i, (n, a, b) in enumerate(zip(names, ["x", "h0", "h1"], ["h0", "h1", "y"]))]
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], ws), opset_imports=[helper.make_opsetid("", 17)]),
              str(src))
    for family, cls in ADAPTERS.items():
        info = quantize("int8", src, tmp_path / f"{family}.onnx", keep_fp32=cls.int8_keep_fp32, block_size=32,
                        accuracy_level=4)
        assert info["kept_fp32"] == [n for n in names if any(k in n for k in cls.int8_keep_fp32)], family
