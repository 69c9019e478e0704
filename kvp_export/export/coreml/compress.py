"""Weight compression of the converted float16 models with coremltools.optimize.coreml.

- int8: symmetric linear quantization per output channel (iOS 16+);
- int4: symmetric linear quantization per block of `block_size` input channels (iOS 18);
- palettize4: 4-bit k-means look-up tables per group of `group_size` output channels (iOS 18).
Every weight of at least WEIGHT_THRESHOLD elements is compressed except the RoPE tables:
they are exact cos/sin values indexed by position, and a quantized table would move every
key's angle. coremltools cannot compress a multifunction model, so each function is
compressed before they are merged; the compressors are deterministic (k-means is seeded),
so the base weights the two functions share still deduplicate.
"""

from __future__ import annotations

from . import ct

WEIGHT_THRESHOLD = 2048
ROPE_TABLES = ("_cos_", "_sin_")


def describe(name: str, block_size: int, group_size: int) -> dict:
    """The recipe of one compression, for the manifest."""
    return {
        "fp16": {"weights": "float16"},
        "int8": {"method": "linear_symmetric", "dtype": "int8", "granularity": "per_channel"},
        "int4": {"method": "linear_symmetric", "dtype": "int4", "granularity": "per_block", "block_size": block_size},
        "palettize4": {"method": "kmeans", "nbits": 4, "granularity": "per_grouped_channel", "group_size": group_size},
    }[name] | {"weight_threshold": WEIGHT_THRESHOLD, "skipped": "RoPE tables"}


def _op_config(name: str, block_size: int, group_size: int):
    cfg = ct.optimize.coreml
    if name == "int8":
        return cfg.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                           weight_threshold=WEIGHT_THRESHOLD)
    if name == "int4":
        return cfg.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=block_size, weight_threshold=WEIGHT_THRESHOLD)
    return cfg.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=group_size,
                                  num_kmeans_workers=1, weight_threshold=WEIGHT_THRESHOLD)


def compress(model, name: str, block_size: int, group_size: int):
    """A compressed copy of a single-function float16 MLModel (the model itself for fp16)."""
    if name == "fp16":
        return model
    cfg = ct.optimize.coreml
    names = cfg.get_weights_metadata(model, weight_threshold=WEIGHT_THRESHOLD)
    skip = {n: None for n in names if any(t in n for t in ROPE_TABLES)}
    config = cfg.OptimizationConfig(global_config=_op_config(name, block_size, group_size), op_name_configs=skip)
    if name == "palettize4":
        return cfg.palettize_weights(model, config)
    return cfg.linear_quantize_weights(model, config)
