"""The per-graph work of an export, run in parallel worker processes.

After the fp32 graphs are traced, each graph of each variant needs work that does not depend on
the others: quantizing it (int8, int4), hashing its files, saving onnxruntime's optimised copy,
and, for the fp32 graphs, counting its FLOPs. onnxruntime's quantizers are mostly
single-threaded Python over the graph's protobuf, so on the 2-core reference machine running
these jobs two at a time did 164 s of work in 99 s (BENCHMARKS.md, "The default recipe, second
pass"). Workers are spawned (not forked: the parent holds torch's thread pools); their number is
bounded by the memory one job needs (a few times its graph's size). The int4 quantizer pins
torch to one thread itself (quantize.py), so the bytes do not depend on where it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvp_validate.integrity import known
from kvp_validate.parallel import plan, run_parallel

from ..artifacts import sha256_file
from . import graph_flops
from .optimize import save_optimized
from .quantize import quantize

JOB_MEMORY_FACTOR = 5  # peak memory of one job / its graph's bytes (quantizers hold a few copies)


def graph_files(root: Path, variant: str, name: str) -> dict:
    files = sorted(p for p in (root / variant).glob(f"{name}.onnx*") if p.is_file())
    return {
        "file": f"{variant}/{name}.onnx",
        "bytes": sum(p.stat().st_size for p in files),
        "sha256": {p.name: sha256_file(p) for p in files},
    }


def variant_graph(root: Path, variant: str, name: str, quant: dict | None) -> dict:
    """One graph of one variant: quantized from the fp32 graph (unless fp32), hashed, optimised.
    Returns {"quantization": info or None, "files": ..., "optimized": ...}."""
    info = None
    if variant != "fp32":
        (root / variant).mkdir(exist_ok=True)
        info = quantize(variant, root / "fp32" / f"{name}.onnx", root / variant / f"{name}.onnx", **quant)
    files = graph_files(root, variant, name)
    optimized = save_optimized(root, variant, name, files["sha256"])
    for p in (root / optimized["file"]).parent.glob(f"{name}.onnx*"):  # for the manifest's `files`
        sha256_file(p)
    # the digests go back to the parent (integrity.remember): the manifest does not hash a graph again
    return {"quantization": info, "files": files, "optimized": optimized, "digests": known()}


def flops_job(path: Path, variable: str, series: dict[str, tuple[list[int], list[dict]]]) -> dict:
    """A graph's FLOPs as polynomials in `variable`: {key: coefficients} for each series of
    (lengths, feeds), all counted from one session of the graph."""
    feeds = [f for _, fs in series.values() for f in fs]
    counts = iter(graph_flops.matmul_flops(path, feeds))
    entry: dict = {"variable": variable}
    for key, (xs, fs) in series.items():
        entry[key] = graph_flops.fit_poly(xs, [next(counts) for _ in fs])
    return entry


def worker_count(largest_graph_bytes: int, jobs: int) -> int:
    """As many workers as cores, jobs and memory allow (at least one)."""
    return plan(jobs, os.cpu_count() or 1, JOB_MEMORY_FACTOR * largest_graph_bytes)[0]


def run_graph_jobs(jobs: dict, workers: int, progress: bool) -> dict:
    return run_parallel(jobs, workers, f"export onnx ({workers} workers)", progress, unit="graph")
