#!/usr/bin/env python3
"""End-to-end KVP training against the paper's OE-LP baseline, in one command (meant for a CUDA box).

Stages, each a `kvp` verb writing one folder under OUT (skipped when that folder exists):
  derive (keep ratio, bridge healing) -> fit (ridge) -> train KVP (aux + predictor through the
  frozen base) -> train the baseline (the aux alone, plain CE, the same tokens) -> eval the ridge
  predictor, the trained one, and the baseline aux (its "aux alone" row; the KVP row of that
  report pairs the ridge predictor with an aux it was not fitted to and is not reported).
Prints one JSON summary: tokens, minutes per stage, device, and NLL / agreement per path.

Training checkpoints and resumes, so on a machine that limits a command's time pass
--max-minutes and run the same command again until it prints the summary: exit code 3 means
"not finished, run me again". derive, fit and eval run on the CPU (as the product does).
Offline machines: the base (kvp models pull) and, unless --calib/--heldout/--data are given,
the Shakespeare corpus must already be in KVP_CACHE_DIR.

  python benchmarks/train_gpu.py --base smollm2-135m --keep 0.5 --tokens 5000000 --out runs/train-smollm2
  python benchmarks/train_gpu.py --base qwen2.5-coder-0.5b --keep 0.5 --mix code --nproc 2 --out runs/train-qwen
  CPU smoke test: --device cpu --tokens 4096 --calib-tokens 4096 --eval-n 2 --seq-len 64 --batch 2
                  --prompt-len 24 --cont-len 8 (and a tiny --base folder with --calib/--heldout/--data)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kvp_export.config import DataConfig, EvalConfig, TrainConfig
from kvp_validate.contract import MANIFEST, REPORT_JSON

from _bench import config_args, parser

INCOMPLETE = 3


def kvp_cmd(verb: str, nproc: int = 1) -> list[str]:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launch, "-m", "kvp_export.cli", verb]


def stage(name: str, cmd: list, out: Path) -> bool:
    """Run a stage unless its folder exists; True when the folder exists afterwards."""
    if out.exists():
        print(f"[{name}] exists: {out}", file=sys.stderr, flush=True)
        return True
    print(f"[{name}] {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    rc = subprocess.run([str(c) for c in cmd], stdout=subprocess.DEVNULL).returncode
    if rc:
        raise SystemExit(f"[{name}] failed with exit code {rc}")
    return out.exists()


def repeat(flag: str, values: list[str]) -> list[str]:
    return [x for v in values for x in (flag, v)]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def paths(report: Path) -> dict:
    return json.loads((report / REPORT_JSON).read_text())["results"]["paths"]


def summary(a, out: Path) -> dict:
    tk, tb = manifest(out / "kvp")["training"], manifest(out / "baseline")["training"]
    minutes = {name: round(manifest(out / folder)["wall_seconds"] / 60, 2)
               for name, folder in (("derive", "aux"), ("fit", "ridge"), ("eval_ridge", "eval-ridge"),
                                    ("eval_kvp", "eval-kvp"), ("eval_baseline", "eval-baseline"))
               if (out / folder).exists()}
    minutes.update(train_kvp=round(tk["train_seconds"] / 60, 2), train_baseline=round(tb["train_seconds"] / 60, 2))
    result = {
        "base": a.base, "keep": a.keep, "device": tk["device"], "world_size": tk["world_size"],
        "tokens": {"calibration": manifest(out / "ridge")["calib_tokens"], "train_kvp": tk["tokens"],
                   "train_baseline": tb["tokens"]},
        "minutes": minutes,
        "train_loss_last_tenth": {name: {k: v["mean_last_tenth"] for k, v in t["loss"].items()}
                                  for name, t in (("kvp", tk), ("baseline", tb))},
    }
    if a.no_eval:
        return result
    ridge, trained, baseline = paths(out / "eval-ridge"), paths(out / "eval-kvp"), paths(out / "eval-baseline")
    result["paths"] = {
            "base": ridge["base"], "no_prompt": ridge["no_prompt"], "mean_kv": ridge["mean_kv"],
            "aux_healed": ridge["aux"], "kvp_ridge": ridge["kvp"],
            "aux_trained_kvp": trained["aux"], "kvp_trained": trained["kvp"],
            "aux_baseline_oe_lp": baseline["aux"],
    }
    return result


def main() -> int:
    p = parser(__doc__, out_help="work folder: each stage's output, then the summary (default runs/train-gpu)")
    p.set_defaults(out=Path("runs/train-gpu"))
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=5_000_000, help="training budget, each of KVP and baseline")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for training, under torchrun")
    # the product's own options, help and defaults (kvp_export.config), so the benchmark runs what `kvp train` runs
    config_args(p, TrainConfig, "device", "strategy", "batch", "accum", "seq_len", "lr", "mix", "checkpoint_every",
                checkpoint_every=200)
    p.add_argument("--predictor-lr", type=float)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--data", action="append", default=[])
    p.add_argument("--calib", action="append", default=[])
    p.add_argument("--heldout", action="append", default=[])
    config_args(p, DataConfig, "calib_tokens")
    p.add_argument("--eval-n", type=int, default=64)
    config_args(p, EvalConfig, "prompt_len", "cont_len", "greedy_tokens")
    p.add_argument("--max-minutes", type=float, help="stop training in time to return within this call's limit")
    p.add_argument("--no-eval", action="store_true", help="skip the NLL / agreement evals (e.g. when HumanEval "
                   "is the measure: benchmarks/humaneval_gpu.py)")
    p.add_argument("--threads", type=int, help="CPU threads for the CPU stages (derive, fit, eval); sets "
                   "OMP_NUM_THREADS for them (default: torch's, the physical cores)")
    a = p.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    start, out = time.monotonic(), a.out
    calib = [*repeat("--calib", a.calib), "--calib-tokens", a.calib_tokens]
    stage("derive", [*kvp_cmd("derive"), "--base", a.base, "-k", a.keep, "--heal", "bridge", *calib, "-o", out / "aux"],
          out / "aux")
    stage("fit", [*kvp_cmd("fit"), "--aux", out / "aux", *calib, "-o", out / "ridge"], out / "ridge")
    train = ["--tokens", a.tokens, "--device", a.device, "--strategy", a.strategy, "--batch", a.batch, "--accum",
             a.accum, "--seq-len", a.seq_len, "--lr", a.lr, "--mix", a.mix, *repeat("--data", a.data),
             "--checkpoint-every", a.checkpoint_every, "--resume",
             *(["--activation-checkpointing"] if a.activation_checkpointing else [])]
    for name, extra in (("kvp", [*(["--predictor-lr", a.predictor_lr] if a.predictor_lr else [])]),
                        ("baseline", ["--baseline"])):
        limit = []
        if a.max_minutes is not None:
            left = a.max_minutes - (time.monotonic() - start) / 60
            if left < 1 and not (out / name).exists():
                print(f"[train {name}] no time left in this call; run again", file=sys.stderr)
                return INCOMPLETE
            limit = ["--max-minutes", round(left - 0.5, 2)]
        if not stage(f"train {name}", [*kvp_cmd("train", a.nproc), "--predictor", out / "ridge", *train, *extra,
                                       *limit, "-o", out / name], out / name):
            print(f"[train {name}] stopped at its time limit (checkpointed); run again", file=sys.stderr)
            return INCOMPLETE
    if a.no_eval:
        return finish(a, out)
    ev = ["--n", a.eval_n, "--prompt-len", a.prompt_len, "--cont-len", a.cont_len, "--greedy-tokens",
          a.greedy_tokens, *repeat("--heldout", a.heldout)]
    stage("eval ridge", [*kvp_cmd("eval"), "--predictor", out / "ridge", *ev, "-o", out / "eval-ridge"],
          out / "eval-ridge")
    stage("eval kvp", [*kvp_cmd("eval"), "--predictor", out / "kvp", *ev, "-o", out / "eval-kvp"], out / "eval-kvp")
    stage("eval baseline", [*kvp_cmd("eval"), "--predictor", out / "ridge", "--aux", out / "baseline", *ev,
                            "-o", out / "eval-baseline"], out / "eval-baseline")
    return finish(a, out)


def finish(a, out: Path) -> int:
    """Write and print the run's summary.json."""
    result = summary(a, out)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
