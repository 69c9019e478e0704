"""Crash-safety campaign (issue 14): SIGKILL each stage at random moments, run the same command
again, and check that it finishes, that nothing temporary or partial is left, and that the result
is the uninterrupted run's (the manifests' `files` agree; for validation, the parity results).

Stages: derive, fit, train (--resume), export onnx, export coreml, validate and `kvp run`, on the
tiny models, TRIALS_PER_STAGE kills each (KVP_CAMPAIGN_TRIALS overrides it; KVP_CAMPAIGN_STAGES=a,b
runs only those). Slow (minutes): `nice -n 19 pytest -m slow tests/test_crash_campaign.py`. With
KVP_CAMPAIGN_OUT=FILE the trials are also written there as a markdown table (BENCHMARKS.md,
"Crash-safety campaign").
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "ci.yaml"
TRIALS_PER_STAGE = int(os.environ.get("KVP_CAMPAIGN_TRIALS", "3"))
LEFTOVER = (".partial-", ".old-")


def commands(assets, built, export) -> dict:
    corpus = str(assets["corpus"])
    return {
        "derive": ["derive", "--base", assets["llama"], "-k", "0.5", "--heal", "distill", "--distill-epochs", "2",
                   "--calib", corpus, "--calib-tokens", "4096"],
        "fit": ["fit", "--aux", built["aux"], "--calib", corpus, "--calib-tokens", "4096"],
        "train": ["train", "--predictor", built["pred"], "--steps", "30", "--checkpoint-every", "3", "--data", corpus,
                  "--seq-len", "32", "--batch", "2", "--eval-every", "0", "--resume"],
        "export onnx": ["export", "onnx", "--predictor", built["pred"], "--variant", "fp32", "--variant", "int8",
                        "--heldout", corpus, "--eval-n", "8", "--prompt-len", "24", "--cont-len", "8"],
        "export coreml": ["export", "coreml", "--predictor", built["pred"], "--target", "ios18", "--compress", "fp16",
                          "--context", "64", "--prompt-lengths", "8,16", "--heldout", corpus],
        "validate": ["validate", export, "--check", "parity", "--check", "quality", "--threads", "1"],
        "run": ["run", TINY, "--set", f"base={assets['llama']}", "--set", f"data.calib=[{corpus}]",
                "--set", f"data.heldout=[{corpus}]"],
    }


def start(argv: list, out: Path) -> subprocess.Popen:
    """The CLI command in its own session; stderr to a file beside `out` (a pipe nobody reads would
    block a chatty stage, coremltools' progress bars, at the same point in every trial)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KVP_CACHE_DIR": str(out.parent / "cache")}
    with open(out.parent / f"stderr-{time.monotonic_ns()}.log", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "kvp_export.cli", *map(str, argv), "-o", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def finish(argv: list, out: Path) -> float:
    t0 = time.perf_counter()
    proc = start(argv, out)
    proc.wait(timeout=900)
    err = sorted(out.parent.glob("stderr-*.log"))[-1].read_text(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    return time.perf_counter() - t0


def leftovers(parent: Path) -> list[str]:
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*")
                  if any(x in p.name for x in LEFTOVER) or (p.is_file() and p.name.endswith(".tmp")))


def outcome(verb: str, out: Path) -> object:
    """What must equal the uninterrupted run's: the files' hashes (parity results for a validation)."""
    if verb == "validate":
        return json.loads((out / "report.json").read_text())["results"]["parity"]
    if verb == "run":
        got = {}
        for stage in sorted((out / "stages").iterdir()):
            name = stage.name.rsplit("-", 1)[0]
            got[name] = outcome("validate" if name.startswith("validate") else "derive", stage)
        return got
    return json.loads((out / "manifest.json").read_text())["files"]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_same_command_finishes_with_the_same_bytes(assets, built, fp32_export,
                                                                                     tmp_path):
    rng = random.Random(14)
    rows, failures = [], []
    stages = commands(assets, built, fp32_export)
    only = [x for x in os.environ.get("KVP_CAMPAIGN_STAGES", "").split(",") if x]
    assert set(only) <= set(stages), f"KVP_CAMPAIGN_STAGES: choose from {', '.join(stages)}"
    for verb, argv in stages.items():
        if only and verb not in only:
            continue
        ref_dir = tmp_path / verb / "reference"
        ref_dir.mkdir(parents=True)
        seconds = finish(argv, ref_dir / "out")
        want = outcome(verb, ref_dir / "out")
        for trial in range(TRIALS_PER_STAGE):
            work = tmp_path / verb / f"trial{trial}"
            work.mkdir()
            out = work / "out"
            at = rng.uniform(0.2, 0.95) * seconds
            proc = start(argv, out)
            time.sleep(at)
            finished_first = proc.poll() is not None
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and every worker it started
            except ProcessLookupError:  # it had finished, and nothing of its group was left
                pass
            proc.wait()
            left_after_kill = leftovers(work)
            rerun = None
            if verb == "run" or not out.exists():
                rerun = finish(argv, out)  # the same command (kvp run reuses its folder)
            left = leftovers(work)
            same = outcome(verb, out) == want
            rows.append({"verb": verb, "trial": trial, "uninterrupted_s": round(seconds, 1), "killed_at_s": round(at, 1),
                         "finished_before_kill": finished_first, "left_after_kill": len(left_after_kill),
                         "rerun_s": None if rerun is None else round(rerun, 1), "left_after_rerun": left,
                         "identical": same})
            if left or not same:
                failures.append(rows[-1])
            if os.environ.get("KVP_CAMPAIGN_OUT"):  # after every trial: a failure keeps the table so far
                Path(os.environ["KVP_CAMPAIGN_OUT"]).write_text(table(rows))
    assert (len(rows) >= 10 or only) and not failures, failures


def table(rows: list[dict]) -> str:
    lines = ["| stage | trial | uninterrupted s | SIGKILL at s | partial left by the kill | rerun s | "
             "left after rerun | result identical |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['verb']} | {r['trial']} | {r['uninterrupted_s']} | {r['killed_at_s']} | {r['left_after_kill']} "
              f"| {r['rerun_s'] if r['rerun_s'] is not None else 'not needed (finished)'} | "
              f"{len(r['left_after_rerun'])} | {'yes' if r['identical'] else 'NO'} |" for r in rows]
    return "\n".join(lines) + "\n"
