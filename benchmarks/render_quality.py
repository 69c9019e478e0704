"""Render the BENCHMARKS.md quality table from `kvp eval` report folders.

Usage: python benchmarks/render_quality.py REPORT_DIR [REPORT_DIR ...]
Reads only report.json (no torch), so it also runs where the reports were copied to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvp_validate.contract import REPORT_JSON
from kvp_validate.report import md_table

LABELS = {"base": "base", "aux": "aux alone", "kvp": "KVP", "no_prompt": "no prompt (sink only)",
          "mean_kv": "mean KV (+ exact sink)"}


def main(folders: list[str]) -> None:
    quality, stages = [], []
    for folder in folders:
        rep = json.loads((Path(folder) / REPORT_JSON).read_text())
        res = rep["results"]
        g = res["data"]["greedy_tokens"]
        name = f"{res['aux_layers']}/{res['base_layers']} layers"
        base_nll = res["paths"]["base"]["nll"]
        for path, r in res["paths"].items():
            kv = res["kv_rel_error"] if path == "kvp" else None
            quality.append([name, LABELS[path], r["nll"], r["nll"] - base_nll, r["first_token_agreement"],
                            r[f"greedy{g}_agreement"], r[f"greedy{g}_exact"], r["prefill_flops"] / 1e9,
                            r["flops_ratio_vs_base"], kv["k_mean"] if kv else None, kv["v_mean"] if kv else None])
        st = rep["stages"]
        stages.append([name, st["derive"]["wall_seconds"], st["derive"]["calib_tokens"],
                       st["fit"]["wall_seconds"], st["fit"]["calib_tokens"], st["eval"]["wall_seconds"]])
    print(md_table(["aux", "path", "NLL", "ΔNLL", "first-token agr.", f"greedy-{g} agr.", f"greedy-{g} exact",
                    "prefill GFLOPs", "FLOPs ratio", "K rel. err", "V rel. err"], quality))
    print()
    print(md_table(["aux", "derive s", "derive calib tokens", "fit s", "fit calib tokens", "eval s"], stages, digits=0))


if __name__ == "__main__":
    main(sys.argv[1:])
