"""The BENCHMARKS.md table of benchmarks/cpu_budget.sh: held-out quality of `kvp train` after
5, 15 and 30 minutes against the closed form it started from.

Usage: python benchmarks/render_budget.py OUT   (the folder cpu_budget.sh wrote)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvp_validate.contract import MANIFEST, REPORT_JSON
from kvp_validate.report import md_table


def main(root: Path) -> None:
    evals = {p.name.removeprefix("eval-"): json.loads((p / REPORT_JSON).read_text())
             for p in sorted(root.glob("eval-*")) if (p / REPORT_JSON).is_file()}
    closed = next(k for k in evals if not k.startswith("train-"))
    base = evals[closed]["results"]["paths"]["base"]["nll"]
    print((root / "machine.txt").read_text() if (root / "machine.txt").is_file() else "")
    rows = []
    for name, r in sorted(evals.items(), key=lambda kv: (kv[0] != closed, int(kv[0].split("-")[-1])
                                                          if kv[0].startswith("train-") else 0)):
        kvp = r["results"]["paths"]["kvp"]
        gkey = next(k for k in kvp if k.startswith("greedy") and k.endswith("_agreement"))
        greedy = kvp[gkey]
        if name == closed:
            rows.append(["closed form (ridge)", "-", "-", "-", "-", kvp["nll"], kvp["nll"] - base,
                         kvp["first_token_agreement"], greedy])
            continue
        t = json.loads((root / name / MANIFEST).read_text())["training"]
        h = t["heldout"]
        rows.append([f"kvp train, {name.removeprefix('train-')} min", t["steps"], t["tokens"],
                     round(t["train_seconds"]), f"{h['best_loss']:.3f} (step {h['best_step']})", kvp["nll"],
                     kvp["nll"] - base, kvp["first_token_agreement"], greedy])
    print(f"Base NLL on the same pairs: {base:.3f}\n")
    greedy_head = "greedy-" + gkey.removeprefix("greedy").removesuffix("_agreement") + " agreement"
    print(md_table(["predictor", "steps", "tokens", "train s", "held-out CE in training (best)", "KVP NLL",
                    "ΔNLL vs base", "first-token", greedy_head], rows, 3))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
