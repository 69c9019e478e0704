#!/usr/bin/env python3
"""Everything of one model's GPU comparison (issue 4) in one resumable command.

1. the base: a zoo name (its GGUF may already sit in KVP_CACHE_DIR/gguf/<name>.gguf, so
   no network is needed), converted once into the cache;
2. benchmarks/train_gpu.py: derive (bridge healing) -> fit (ridge) -> train KVP -> train the
   OE-LP baseline (same tokens) -> NLL / agreement evals (unless --humaneval, where pass@1
   is the measure and the evals are skipped);
3. with --humaneval, benchmarks/humaneval_gpu.py: pass@1 on all 164 problems for base,
   aux alone (healed = closed-form aux; baseline = OE-LP aux), KVP closed-form, KVP trained;
4. OUT/<model>.json and OUT/<model>.md: the summary table.

Every stage skips what exists, so an interrupted run continues where it stopped; exit code 3
means "not finished, run the same command again".

  python benchmarks/issue4_gpu.py --model smollm2-135m --work runs/i4 --out results --tokens 2000000
  python benchmarks/issue4_gpu.py --model qwen2.5-coder-0.5b --humaneval --mix code --work runs/i4 --out results
Extra arguments after `--` go to train_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kvp_export.config import DataConfig, TrainConfig

from _bench import config_args

HERE = Path(__file__).resolve().parent
INCOMPLETE = 3


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(model: str, train: dict, he: dict | None) -> str:
    lines = [f"## {model}, keep {train.get('keep')}", "",
             f"device: {train.get('device')}; tokens: {train.get('tokens')}; minutes: {train.get('minutes')}", ""]
    p = train.get("paths")
    if p:
        lines += ["| path | NLL | first-token agreement | greedy agreement |", "|---|---|---|---|"]
        for name in ("base", "no_prompt", "mean_kv", "aux_healed", "aux_baseline_oe_lp", "kvp_ridge",
                     "aux_trained_kvp", "kvp_trained"):
            r = p.get(name) or {}
            greedy = next((v for k, v in r.items() if k.startswith("greedy") and k.endswith("_agreement")), None)
            lines.append(f"| {name} | {fmt(r.get('nll'))} | {fmt(r.get('first_token_agreement'))} | {fmt(greedy)} |")
        lines.append("")
    if he:
        lines += ["| path | pass@1 | passed | relative to base | generate s |", "|---|---|---|---|---|"]
        for name, r in he.items():
            lines.append(f"| {name} | {fmt(r['pass_at_1'])} | {r['passed']}/{r['n_problems']} | "
                         f"{fmt(r.get('relative_to_base'), 2)} | {r['seconds']['generate']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="zoo name (or any base spec)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=2_000_000)
    config_args(p, DataConfig, "calib_tokens")
    config_args(p, TrainConfig, "batch", "mix", batch=32)  # kvp train's help; the GPU runs' own batch
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--humaneval", action="store_true")
    p.add_argument("--allow-unsafe-execution", action="store_true",
                   help="HumanEval without an OS sandbox (passed on to humaneval_gpu.py; docs/sandbox.md)")
    p.add_argument("--he-batch", type=int, default=32)
    p.add_argument("--he-limit", type=int)
    p.add_argument("--he-runs", help="comma-separated HumanEval paths, in this order (default: all five: "
                   "base,aux_healed,aux_baseline,kvp_ridge,kvp_trained)")
    p.add_argument("--max-minutes", type=float, default=1e9)
    p.add_argument("rest", nargs="*", help="after --: more train_gpu.py arguments")
    a = p.parse_args()
    start = time.monotonic()
    left = lambda: a.max_minutes - (time.monotonic() - start) / 60
    name = Path(a.model).name
    work = a.work / name
    a.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[issue4 {name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    cmd = [sys.executable, str(HERE / "train_gpu.py"), "--base", a.model, "--keep", str(a.keep), "--tokens",
           str(a.tokens), "--calib-tokens", str(a.calib_tokens), "--batch", str(a.batch), "--mix", a.mix,
           "--out", str(work), "--max-minutes", str(round(left(), 2)),
           *(["--no-eval"] if a.humaneval else []), *a.rest]
    log(" ".join(cmd))
    t0 = time.monotonic()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    log(f"train_gpu.py rc {rc} after {(time.monotonic() - t0) / 60:.1f} min")
    if rc:
        return rc
    train = json.loads((work / "summary.json").read_text())
    he = None
    if a.humaneval:
        runs = ["base=base", f"aux_healed=aux:{work / 'aux'}", f"aux_baseline=aux:{work / 'baseline'}",
                f"kvp_ridge=kvp:{work / 'ridge'}", f"kvp_trained=kvp:{work / 'kvp'}"]
        if a.he_runs:
            by_name = {r.split("=", 1)[0]: r for r in runs}
            runs = [by_name[n] for n in a.he_runs.split(",")]
        cmd = [sys.executable, str(HERE / "humaneval_gpu.py"), "--base", a.model, "--out", str(work / "humaneval"),
               "--batch", str(a.he_batch), *(["--limit", str(a.he_limit)] if a.he_limit else []),
               *(["--allow-unsafe-execution"] if a.allow_unsafe_execution else []),
               *[x for r in runs for x in ("--run", r)]]
        log(" ".join(cmd))
        try:
            rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=max(1.0, left() * 60)).returncode
        except subprocess.TimeoutExpired:
            log("HumanEval stopped at the time limit; finished paths are kept; run again")
            return INCOMPLETE
        if rc:
            return rc
        he = json.loads((work / "humaneval" / "summary.json").read_text())
    result = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "train": train, "humaneval": he}
    (a.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / f"{name}.md").write_text(markdown(name, train, he) + "\n")
    print((a.out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
