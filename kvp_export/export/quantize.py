"""Quantized variants of the fp32 graphs, through onnxruntime's own quantization tools.

int8, two methods (`int8_method`):
- "dynamic" (default): onnxruntime's dynamic quantization of the weight MatMuls (int8 weights
  per output channel in a 7-bit range, activations quantized to uint8 per tensor on the fly;
  the 7-bit range (`reduce_range`) keeps onnxruntime's AVX2 u8 x s8 kernels, which add pairs of
  products in saturating int16, exact, so the graph computes the same on CPUs with and without
  VNNI; with full 8-bit weights an AVX2-only CPU measured a logits error of 0.49 where VNNI
  CPUs measured 0.15 (BENCHMARKS.md, "int8 across CPUs"); attention's
  activation-by-activation MatMuls and the embedding stay fp32). The MatMuls whose inputs
  carry the attention sink's massive activations stay fp32 too: the MLP down projections and
  the q/k/v projections (with the predictor fused into them), since one per-tensor activation
  scale for those crushes every other token. Measured on smollm2-135m keep 0.50 (parity
  against the PyTorch reference): all MatMuls per tensor, KVP logits relative error 2.76 and
  cache error 1.05 (broken); down projections kept, per-channel weights: 0.51 / 0.38; q/k/v
  kept as well: 0.15 / 0.22.
- "weight-only": MatMulNBits with 8-bit weights in blocks of 128 (+0.013 nats there); no
  activation outliers problem, but slower prefill on CPUs (see BENCHMARKS.md).
int4, weight-only MatMulNBits, blocks of `block_size` along K (`int4_method`):
- "hqq" (default): half-quadratic optimisation of scales and float zero points (no calibration
  data); +0.08 nats against +0.26 for plain round-to-nearest at block 32 on smollm2-135m, whose
  GGUF weights are already 4-bit with a float minimum per block of 32, which HQQ recovers and an
  integer zero point cannot. The float zero points are split off into a small per-block offset
  term (zero_points.py), so onnxruntime runs its fast integer kernels on them;
- "rtn": symmetric round-to-nearest.
The LM head of the int4 variant is 8-bit (round-to-nearest, integer zero points, blocks of 32):
with 4-bit weights elsewhere and an 8-bit LM head, smollm2-135m's base is within 0.005 nats of fp32.
`accuracy_level` 4 lets the CPU kernels compute in int8 (fast); 0 keeps fp32 compute.
Every variant keeps the graph's inputs and outputs, so every runtime path runs on any of them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx

from ..config import OnnxConfig, default_of
from ..errors import KvpError
from ..stage import torch_threads
from .to_onnx import EXTERNAL_DATA_BYTES, check_graph
from .zero_points import split_float_zero_points

# int4 keeps the LM head (the tied embedding, not 4-bit in the GGUF sources) at 8 bits: on
# smollm2-135m it carried nearly all of int4's loss (BENCHMARKS.md, "int4 that pays off")
LM_HEAD, INT4_LM_HEAD_BITS, LM_HEAD_BLOCK = "lm_head", 8, 32


@contextlib.contextmanager
def _quiet():
    """The quantizers log advice on the root logger for every graph; keep the progress bar readable."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # HQQ's torch.from_numpy on read-only arrays
            yield
    finally:
        logging.disable(logging.NOTSET)


def _large(path: Path) -> bool:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) > EXTERNAL_DATA_BYTES


def _outlier_nodes(model: onnx.ModelProto, keep_fp32: tuple[str, ...]) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(k in n.name for k in keep_fp32)]


def quantize_dynamic_int8(src: Path, dst: Path, keep_fp32: tuple[str, ...], reduce_range: bool = True,
                          weight_type: str = "int8") -> list[str]:
    """Dynamic int8 of every weight MatMul except those whose traced name contains one of
    `keep_fp32` (the model family's adapter's `int8_keep_fp32`); returns the names kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = _outlier_nodes(onnx.load(str(src), load_external_data=False), keep_fp32)
    wtype = QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8
    with _quiet():
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=wtype, per_channel=True,
                         reduce_range=reduce_range, nodes_to_exclude=kept, use_external_data_format=_large(src),
                         extra_options={"MatMulConstBOnly": True})
    return kept


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int, method: str,
                   lm_head_bits: int | None = None) -> None:
    """MatMulNBits weights of `bits` for every weight MatMul; the LM head's at `lm_head_bits`
    (round-to-nearest with integer zero points, blocks of 32) when given."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src))
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and LM_HEAD in n.name] if lm_head_bits else []
    # HQQ optimises scales with torch; its reductions' order, and so the int4 graph's bytes,
    # depend on torch's thread count (3 of 5 SmolLM2 graphs differed between 1 and 2 threads):
    # on one thread the graph is the same on every machine, whatever its cores
    with _quiet(), torch_threads(1):
        if method == "hqq":
            q = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits),
                                     nodes_to_exclude=head)
        else:
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=head)
        q.process()
        if head:
            rest = [n.name for n in q.model.model.graph.node if n.op_type == "MatMul" and n.name not in head]
            q = MatMulNBitsQuantizer(q.model.model, bits=lm_head_bits, block_size=LM_HEAD_BLOCK, is_symmetric=False,
                                     accuracy_level=accuracy_level, nodes_to_exclude=rest)
            q.process()
    for node in q.model.model.graph.node:  # HQQ's config has no accuracy level: set it on the nodes
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", accuracy_level)])
    # HQQ's float zero points send onnxruntime down a dequantize-every-call path: split them off
    split_float_zero_points(q.model.model)
    q.model.save_model_to_file(str(dst), use_external_data_format=_large(src))


def quantize(variant: str, src: Path, dst: Path, *, keep_fp32: tuple[str, ...], block_size: int, accuracy_level: int,
             int8_method: str = default_of(OnnxConfig, "int8_method"),
             int4_method: str = default_of(OnnxConfig, "int4_method")) -> dict:
    """Write the `variant` of graph `src` to `dst`, check it, and return what was done (for the
    manifest). `keep_fp32`: the family's MatMuls that dynamic int8 leaves in fp32 (Adapter.int8_keep_fp32)."""
    if variant == "int8" and int8_method == "dynamic":
        info = {"method": "dynamic", "weights": "int8 per output channel, 7-bit range (reduce_range)",
                "activations": "uint8 per tensor, computed at run time",
                "why_reduce_range": "exact on AVX2 without VNNI (no int16 saturation), same on every x86-64 CPU",
                "kept_fp32": quantize_dynamic_int8(src, dst, tuple(keep_fp32), reduce_range=True)}
    elif variant == "int8":
        quantize_nbits(src, dst, 8, 128, accuracy_level, "rtn")
        info = {"method": "weight-only", "bits": 8, "block_size": 128, "accuracy_level": accuracy_level}
    elif variant == "int4":
        quantize_nbits(src, dst, 4, block_size, accuracy_level, int4_method, lm_head_bits=INT4_LM_HEAD_BITS)
        info = {"method": int4_method, "bits": 4, "block_size": block_size, "accuracy_level": accuracy_level,
                "lm_head": {"method": "rtn", "bits": INT4_LM_HEAD_BITS, "block_size": LM_HEAD_BLOCK,
                            "zero_points": "integer"}}
    else:
        raise KvpError(f"no quantizer for variant '{variant}'")
    check_graph(dst)
    return info
