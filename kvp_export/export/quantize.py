"""Quantized variants of the fp32 graphs, through onnxruntime's own quantization tools.

- int8: dynamic quantization of the weight MatMuls (weights int8 per tensor, activations
  quantized on the fly). Attention's activation-by-activation MatMuls stay fp32
  (`MatMulConstBOnly`), the embedding Gather stays fp32.
- int4: weight-only MatMulNBits, blocks of `block_size` along K, symmetric. accuracy_level 4
  lets the CPU kernels compute in int8 (fast prefill); 0 keeps fp32 compute.
Both leave graph inputs and outputs unchanged, so every runtime path works on any variant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ..errors import KvpError
from .to_onnx import EXTERNAL_DATA_BYTES, check_graph

VARIANTS = ("fp32", "int8", "int4")


def check_variants(variants: list[str] | tuple[str, ...], block_size: int, accuracy_level: int) -> list[str]:
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise KvpError(f"unknown ONNX variant '{bad[0]}' (choose from {', '.join(VARIANTS)})")
    if "fp32" not in variants:
        variants = ["fp32", *variants]  # the others are made from it, and parity is checked against it
    if block_size < 16 or block_size & (block_size - 1):
        raise KvpError(f"int4 block size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise KvpError(f"int4 accuracy level must be 0-4, got {accuracy_level}")
    return list(dict.fromkeys(variants))


def _large(path: Path) -> bool:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) > EXTERNAL_DATA_BYTES


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=False,
                     use_external_data_format=_large(src), extra_options={"MatMulConstBOnly": True})
    check_graph(dst)


def quantize_int4(src: Path, dst: Path, block_size: int = 32, accuracy_level: int = 4) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=_large(src))
    check_graph(dst)


def quantize(variant: str, src: Path, dst: Path, *, block_size: int, accuracy_level: int) -> None:
    if variant == "int8":
        quantize_int8(src, dst)
    elif variant == "int4":
        quantize_int4(src, dst, block_size, accuracy_level)
    else:
        raise KvpError(f"no quantizer for variant '{variant}'")
