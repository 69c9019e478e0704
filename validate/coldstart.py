"""Cold start: from a fresh process to the first token, as an app that has just launched pays it.

For each variant, path and prompt length a new Python process opens the export, creates the
sessions the path needs to generate (its prefill graph and its decoder, concurrently; see
runtime.GRAPHS_FOR; their files' hashes are checked first, untimed), runs one prefill (the first call, with its one-time allocations) and then
`repeats` more (warm). Reported per point, in ms: `open` (manifest and file checks),
`load` (session creation, wall) and each graph's own creation time, `first_call`, `warm`
(median), and `first_token` = open + load + first_call, the time from a launched process with
onnxruntime imported to the first token. Python's own start and imports are reported apart
(`import`): an app embedding onnxruntime pays them differently.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .errors import KvpError
from .options import DEFAULTS, check

PATHS = ("base", "aux", "kvp", "auto")  # auto: the default mode, KVP from the export's crossover on
LENGTHS = DEFAULTS["coldstart_lengths"]


def run_coldstart(folder: str | Path, variant: str, *, paths: tuple[str, ...] = PATHS,
                  lengths: tuple[int, ...] = LENGTHS, threads: int = DEFAULTS["threads"], repeats: int = 3,
                  runs: int = DEFAULTS["coldstart_runs"],
                  timeout: float = 600, progress: bool = False) -> dict:
    """Measure each (path, length) in `runs` fresh processes (interleaved across paths, since
    one process's load time varies by tens of percent with the OS's page cache); each figure
    of a point is the median over its runs. Lengths the export's context cannot hold are
    skipped (and listed under "skipped")."""
    from tqdm.auto import tqdm

    from .artifact import OnnxArtifact
    from .integrity import share_verified
    from .runtime import OnnxKVP

    check(coldstart_lengths=lengths, coldstart_runs=runs)  # as given: lengths past the context are skipped
    art = OnnxArtifact.open(folder)
    context = art.model.get("context") or 0
    # every graph of the variant hashed here, once; the children find the digests in their environment
    OnnxKVP(art, variant, threads).verify()
    share_verified(folder)
    skipped = [n for n in lengths if context and n >= context]
    lengths = tuple(n for n in lengths if n not in skipped)
    points = []
    grid = [(path, n) for _ in range(runs) for n in lengths for path in paths]
    got: dict[tuple[str, int], list[dict]] = {}
    for path, n in tqdm(grid, desc=f"cold start {variant}", unit="process", disable=not progress):
        cmd = [sys.executable, "-m", "kvp_validate.coldstart", str(folder), variant, path, str(n), str(threads),
               str(repeats)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KvpError(f"cold start {variant} {path} 1x{n}: no answer in {timeout:.0f} s") from None
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise KvpError(f"cold start {variant} {path} 1x{n} failed: {last}")
        got.setdefault((path, n), []).append(json.loads(res.stdout.strip().splitlines()[-1]))
    for rs in got.values():
        point = {k: (_median([r[k] for r in rs]) if k.endswith("_ms") and k != "graphs_ms" else rs[0][k])
                 for k in rs[0]}
        point["graphs_ms"] = {g: statistics.median(r["graphs_ms"][g] for r in rs) for g in rs[0]["graphs_ms"]}
        point["runs"] = len(rs)
        points.append(point)
    return {"variant": variant, "threads": threads, "repeats": repeats, "runs": runs, "points": points,
            "skipped": skipped}


def _median(values: list):
    return None if any(v is None for v in values) else statistics.median(values)


def _child(folder: str, variant: str, path: str, n: int, threads: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    import numpy as np

    from .artifact import OnnxArtifact
    from .runtime import GRAPHS_FOR, OnnxKVP

    t_import = time.perf_counter()
    # the files' hashes, checked before any timer (the parent's digests, else hashed here)
    OnnxKVP(OnnxArtifact.open(folder), variant, threads).verify(GRAPHS_FOR[path])
    t1 = time.perf_counter()
    art = OnnxArtifact.open(folder)
    rt = OnnxKVP(art, variant, threads)
    t2 = time.perf_counter()
    load = rt.load(path)
    ids = np.random.default_rng(0).integers(0, rt.model["vocab"], size=(1, n), dtype=np.int64)
    mask = np.ones_like(ids)

    def call() -> float:
        s = time.perf_counter()
        rt.prefill(ids, mask, path)
        return (time.perf_counter() - s) * 1e3

    first = call()
    warm = statistics.median([call() for _ in range(repeats)]) if repeats else None
    open_ms = (t2 - t1) * 1e3
    return {"path": path, "batch": 1, "prompt_len": n, "import_ms": (t_import - t0) * 1e3, "open_ms": open_ms,
            "load_ms": load["wall"] * 1e3, "graphs_ms": {k: v * 1e3 for k, v in load.items() if k != "wall"},
            "first_call_ms": first, "warm_ms": warm, "first_token_ms": open_ms + load["wall"] * 1e3 + first}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(_child(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]))))
