"""Throughput-bound checks of several variants in parallel worker processes.

Quality runs thousands of small onnxruntime calls (decode steps at batch 8) that use a second
thread poorly for fp32 and int8 (1.3-1.4x from two threads), though well for int4 (2.1x); on
2 cores the parallel phase, slowest variant first, is about as long as the variants in turn
(BENCHMARKS.md, "The default recipe, second pass"); with a larger thread budget it gains. Timing checks (TTFT, cold start) never run here: they run
alone, in the main process, after the parallel work. Workers are spawned processes, bounded by
cores, the thread budget and the memory one variant's sessions need.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm.auto import tqdm


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan(jobs: int, threads: int, memory_per_job: int) -> tuple[int, int]:
    """(workers, threads per worker) within the thread budget, the cores and the memory."""
    workers = min(jobs, threads, os.cpu_count() or 1)
    mem = available_memory()
    if mem is not None and memory_per_job > 0:
        workers = min(workers, mem // memory_per_job)
    workers = max(1, int(workers))
    return workers, max(1, threads // workers)


def run_parallel(jobs: dict[object, tuple[Callable, tuple]], workers: int, desc: str, progress: bool, *,
                 unit: str = "job") -> dict:
    """{key: fn(*args)} for `jobs` = {key: (fn, args)}, `workers` spawned processes at a time
    (in this process when 1). A job's error (a KvpError, say) is raised here, the rest cancelled."""
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress)
    out = {}
    try:
        if workers <= 1:
            for key, (fn, args) in jobs.items():
                out[key] = fn(*args)
                bar.update()
            return out
        ctx = multiprocessing.get_context("spawn")  # not fork: the parent may hold thread pools
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(fn, *args): key for key, (fn, args) in jobs.items()}
            try:
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return out
    finally:
        bar.close()
