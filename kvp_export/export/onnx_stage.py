"""The ONNX export stage as the pipeline calls it: an `OnnxConfig` in, `export_onnx` run with it.

(`onnx_export.export_onnx` keeps its keyword arguments; this is the one place that maps the
config's fields onto them, for `kvp export onnx` and `kvp run` alike.)
"""

from __future__ import annotations

from pathlib import Path

from ..config import OnnxConfig, configure


def export(predictor: str | Path, out: str | Path, config: OnnxConfig | None = None, *,
           heldout: list[str] | None = None, overwrite: bool = False, seed: int = 0, progress: bool = True,
           **options) -> Path:
    """Export `predictor` (a fit folder) to `out` as `config` (or `options`, its fields by name) says."""
    from .onnx_export import export_onnx

    (cfg,) = configure(options, (OnnxConfig, config))
    return export_onnx(predictor, out, variants=cfg.all_variants(), block_size=cfg.block_size,
                       accuracy_level=cfg.accuracy_level, int8_method=cfg.int8_method, int4_method=cfg.int4_method,
                       eval_n=cfg.eval_n, prompt_len=cfg.prompt_len, cont_len=cfg.cont_len, tail=cfg.tail,
                       heldout=list(heldout or []), overwrite=overwrite, seed=seed, progress=progress)
