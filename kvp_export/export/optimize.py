"""Graphs onnxruntime has already optimised, saved at export so that sessions load faster.

Creating an onnxruntime session runs its graph optimisers (constant folding, fusions) before
the first call; on the exported graphs that is a large share of the load time (BENCHMARKS.md,
"Load time"). The export runs them once per graph and saves the result beside the source
(`optimized/<variant>/<graph>.onnx`), at the "extended" level: onnxruntime documents that
level's output as portable across CPUs, unlike the "all" level's layout changes. The
manifest records, per optimised graph, its file, size, the source graph's SHA-256 and the
onnxruntime version; the runtime (kvp_validate.runtime.optimized_graph) uses a copy only when
both still match and otherwise loads the source graph with a one-line warning.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from kvp_validate.runtime import OPTIMIZED_DIR  # the runtime reads what this writes

LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def save_optimized(root: Path, variant: str, name: str, source_sha256: dict) -> dict:
    """Optimise `root/variant/name.onnx` and save it under `root/optimized/variant/`; return its record."""
    src = root / variant / f"{name}.onnx"
    dst_dir = root / OPTIMIZED_DIR / variant
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{name}.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVEL
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    # Weights go to a side file, always: onnxruntime memory-maps external initializers instead of
    # parsing them out of the protobuf and copying them, which cut the fp32 base decoder's session
    # creation from 1.41 s to 0.59 s (BENCHMARKS.md, "Load time"); it also keeps graphs of any size
    # under protobuf's 2 GB limit.
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.onnx.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    opts.add_session_config_entry("session.disable_prepacking", "1")  # nothing is run: skip the packing work
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    files = sorted(p for p in dst_dir.glob(f"{name}.onnx*") if p.is_file())
    return {"file": f"{OPTIMIZED_DIR}/{variant}/{name}.onnx", "bytes": dst.stat().st_size,
            "files_bytes": sum(p.stat().st_size for p in files), "source_sha256": source_sha256,
            "onnxruntime": ort.__version__, "level": "extended"}
