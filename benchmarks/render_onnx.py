"""BENCHMARKS.md tables from benchmarks/onnx_smollm2.sh's outputs (validator reports + manifests).

Usage: python benchmarks/render_onnx.py runs/bench-onnx
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvp_validate.contract import MANIFEST, REPORT_JSON
from kvp_validate.report import md_table
from kvp_validate.ttft import poly


def table(title: str, headers: list[str], rows: list[list], digits: int = 3, end: str = "\n") -> None:
    """One section of the output: its title, then its rows as a Markdown table."""
    print(title + "\n")
    print(md_table(headers, rows, digits) + end)


def main(root: Path) -> None:
    reports = {d.name: json.loads((d / "validate" / REPORT_JSON).read_text()) for d in sorted(root.glob("keep-*"))
               if (d / "validate" / REPORT_JSON).is_file()}
    manifests = {k: json.loads((root / k / "onnx" / MANIFEST).read_text()) for k in reports}
    first = next(iter(reports.values()))
    print(f"Machine: {first['machine']['cpu']}, {first['machine']['cores']} cores; onnxruntime "
          f"{first['machine']['onnxruntime']}; {first['created'][:10]}.\n")

    rows = []
    for k, m in manifests.items():
        for v, graphs in m["variants"].items():
            rows.append([k, v, *[graphs[g]["bytes"] / 1e6 for g in ("kvp_prefill", "base_decode", "base_prefill",
                                                                      "aux_prefill")], m["wall_seconds"]])
    table("Export (graph sizes in MB; export wall time):",
          ["aux", "variant", "kvp_prefill", "base_decode", "base_prefill", "aux_prefill", "export s"], rows, 1)

    rows = []
    for k, m in manifests.items():
        f = m["flops"]
        for n in (512, 1024):
            base, aux = poly(f["base_prefill"]["coef"], n), poly(f["aux_prefill"]["coef"], n)
            kvp = poly(f["kvp_prefill"]["coef"], n) + poly(f["base_decode"]["first_step"], n - 1)
            rows.append([k, n, base / 1e9, aux / 1e9, poly(f["kvp_prefill"]["coef"], n) / 1e9,
                         poly(f["base_decode"]["first_step"], n - 1) / 1e9, kvp / 1e9, base / kvp, kvp / aux])
    table("FLOPs per sequence counted on the exported graphs (GFLOP; KVP = kvp_prefill + the base's first step):",
          ["aux", "N", "base_prefill", "aux_prefill", "kvp_prefill", "first step", "KVP", "base / KVP", "KVP / aux"],
          rows, 3)

    rows = []
    for k, r in reports.items():
        rerun = root / k / "parity" / REPORT_JSON  # a parity-only re-run, when there is one
        if rerun.is_file():
            r = json.loads(rerun.read_text())
        for v, p in r["results"]["parity"].items():
            c = {(x["graph"], x["metric"]): x["value"] for x in p["checks"]}
            rows.append([k, v, c[("base_prefill", "logits_rel")], c[("kvp_prefill + base_decode", "logits_rel")],
                         c[("kvp_prefill", "kv_rel")], c[("base_decode (first step)", "greedy8_agreement")],
                         "pass" if p["ok"] else "FAIL"])
    table("Parity with the PyTorch reference (worst-row logits relative error; greedy-8 agreement):",
          ["aux", "variant", "base logits", "KVP logits", "KVP cache", "KVP greedy-8", "within tolerance"], rows, 4)

    rows = []
    for k, r in reports.items():
        for v, q in r["results"]["quality"].items():
            p = q["paths"]
            g = f"greedy{q['greedy_tokens']}_agreement"
            rows.append([k, v, p["base"]["nll"], p["kvp"]["nll"], p["kvp"]["first_token_agreement"], p["kvp"][g],
                         p["aux"]["nll"], p["aux"]["first_token_agreement"]])
    table("Accuracy through onnxruntime (held-out pairs; NLL / first-token agreement / greedy-16 agreement):",
          ["aux", "variant", "base NLL", "KVP NLL", "KVP first-token", "KVP greedy-16", "aux NLL", "aux first-token"],
          rows)

    rows = []
    for k, r in reports.items():
        for v, t in r["results"]["ttft"].items():
            for p in t["points"]:
                ms = p["ms"]
                rows.append([k, v, f"{p['batch']}x{p['prompt_len']}", ms["base"], ms["kvp"], ms["kvp_prefill"],
                             ms["base_first_step"], ms["aux"], p["kvp_speedup"], p["kvp_flops_ratio"],
                             p["kvp_efficiency"], p["kvp_over_aux"], ms["base_step"]])
    table("TTFT (ms, medians; ratios from the same run):",
          ["aux", "variant", "BxN", "base", "KVP", "kvp_prefill", "first step", "aux alone", "speedup", "FLOPs ratio",
           "efficiency", "KVP/aux", "decode step"], rows, 2)

    opt = root / "optimum" / "optimum_reference.json"
    if opt.is_file():
        o = json.loads(opt.read_text())
        rows = [[p["prompt_len"], p["ms"]["prefill_optimum"], p["ms"]["prefill_ours"], p["prefill_ours_over_optimum"],
                 p["ms"]["decode_optimum"], p["ms"]["decode_ours"], p["decode_ours_over_optimum"]] for p in o["points"]]
        table(f"optimum's export of the base vs ours (fp32, {o['threads']} threads, ms):",
              ["N", "optimum prefill", "our base_prefill", "ratio", "optimum decode step", "our decode step", "ratio"],
              rows, 2, end="")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
