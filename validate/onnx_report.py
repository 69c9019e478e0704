"""`kvp validate DIR`: parity, accuracy and TTFT of an ONNX export, as report.json + report.md.

The report folder is written atomically. report.json carries every measurement, a flat
`metrics` dict that gates address, and the gate results; the exit code is non-zero when a
gate fails (see cli.py).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from .artifact import OnnxArtifact
from .errors import KvpError
from .gates import Gate, evaluate, flatten
from .parity import run_parity
from .quality import run_quality
from .report import md_table, write_report_folder
from .ttft import run_ttft

CHECKS = ("parity", "quality", "ttft", "humaneval")


def machine() -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def validate_onnx(folder: str | Path, out: str | Path, *, variants: list[str] | None = None,
                  checks: tuple[str, ...] = ("parity", "quality", "ttft"), gates: list[str] | None = None,
                  threads: int = 2, quality_n: int | None = None, greedy_tokens: int = 16,
                  lengths=(128, 512, 1024), batches=(1, 4, 8), warmup: int = 1, repeats: int = 5,
                  humaneval_limit: int | None = None, tolerances: dict | None = None, overwrite: bool = False,
                  progress: bool = False) -> dict:
    """Run the checks on each variant and write the report folder `out`; return the payload."""
    parsed = [Gate.parse(g) for g in gates or []]
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        raise KvpError(f"unknown check '{bad[0]}' (choose from {', '.join(CHECKS)})")
    out = Path(out)
    if out.exists() and not overwrite:
        raise KvpError(f"output folder exists: {out} (pass --overwrite to replace it)")
    art = OnnxArtifact.open(folder)
    variants = variants or art.variants
    for v in variants:
        art.check_variant(v)
    art.tokenizer()  # a mismatched tokenizer fails before any measurement
    t0 = time.perf_counter()
    results: dict = {c: {} for c in checks}
    for v in variants:
        if "parity" in checks:
            results["parity"][v] = run_parity(art, v, threads, (tolerances or {}).get(v))
        if "quality" in checks:
            results["quality"][v] = run_quality(art, v, n=quality_n, greedy_tokens=greedy_tokens, threads=threads,
                                                progress=progress)
        if "ttft" in checks:
            results["ttft"][v] = run_ttft(art, v, lengths=lengths, batches=batches, threads=threads, warmup=warmup,
                                          repeats=repeats, progress=progress)
        if "humaneval" in checks:
            from .humaneval_onnx import run_humaneval_onnx

            results["humaneval"][v] = run_humaneval_onnx(art, v, limit=humaneval_limit, threads=threads,
                                                         progress=progress)
    metrics = flatten(_metrics(results))
    gate_results = evaluate(parsed, metrics)
    payload = {
        "export": str(Path(folder).resolve()),
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
        "variants": variants,
        "model": art.model,
        "results": results,
        "metrics": metrics,
        "gates": gate_results,
        "ok": all(g["ok"] for g in gate_results),
    }
    write_report_folder(out, payload, markdown(payload), overwrite)
    return payload


def _metrics(results: dict) -> dict:
    """The gateable numbers: parity.<variant>.ok and per-check values, quality per path, TTFT per point."""
    m: dict = {}
    for v, r in results.get("parity", {}).items():
        m.setdefault("parity", {})[v] = {"ok": r["ok"], **{f"{c['graph']}.{c['metric']}".replace(" ", "_"): c["value"]
                                                          for c in r["checks"]}}
    for v, r in results.get("quality", {}).items():
        base_nll = r["paths"].get("base", {}).get("nll")
        m.setdefault("quality", {})[v] = {  # delta_nll: the path's NLL minus the base's (quality vs the base)
            path: dict(vals) | ({"delta_nll": vals["nll"] - base_nll} if base_nll is not None and "nll" in vals else {})
            for path, vals in r["paths"].items()}
    for v, r in results.get("ttft", {}).items():
        m.setdefault("ttft", {})[v] = {
            f"{p['batch']}x{p['prompt_len']}": {k: p[k] for k in ("kvp_speedup", "kvp_flops_ratio", "kvp_efficiency",
                                                                  "aux_speedup", "kvp_over_aux")}
            | {f"ms_{k}": val for k, val in p["ms"].items()}
            for p in r["points"]
        }
    for v, r in results.get("humaneval", {}).items():
        m.setdefault("humaneval", {})[v] = {path: {"pass@1": res["pass@1"]} for path, res in r["paths"].items()}
    return m


def markdown(p: dict) -> str:
    mach = p["machine"]
    lines = [f"# Validation of {p['export']}", "",
             f"{p['created']} on {mach['cpu']} ({mach['cores']} cores), onnxruntime {mach['onnxruntime']}; "
             f"{p['seconds']} s.", ""]
    res = p["results"]
    if res.get("parity"):
        lines += ["## Parity with the PyTorch reference", ""]
        rows = [[v, c["graph"], c["metric"], c["value"], c["limit"], "ok" if c["ok"] else "FAIL"]
                for v, r in res["parity"].items() for c in r["checks"]]
        lines += [md_table(["variant", "graph", "metric", "value", "limit", ""], rows, 4), ""]
    if res.get("quality"):
        q0 = next(iter(res["quality"].values()))
        g = q0["greedy_tokens"]
        lines += ["## Accuracy through the runtime", "",
                  f"{q0['sequences']} held-out pairs, prompt {q0['prompt_len']} + continuation {q0['cont_len']} tokens.", ""]
        rows = [[v, path, r["nll"], r["first_token_agreement"], r[f"greedy{g}_agreement"], r[f"greedy{g}_exact"]]
                for v, q in res["quality"].items() for path, r in q["paths"].items()]
        lines += [md_table(["variant", "path", "NLL", "first-token agreement", f"greedy-{g} agreement",
                            f"greedy-{g} exact"], rows), ""]
    if res.get("ttft"):
        t0 = next(iter(res["ttft"].values()))
        lines += ["## Time to first token (onnxruntime, CPU)", "",
                  f"{t0['threads']} threads, {t0['warmup']} warm-up, median of {t0['repeats']} interleaved rounds; "
                  "ms per call for the whole batch. KVP = kvp_prefill + the base's first step. Efficiency = "
                  "measured speedup / FLOPs ratio (FLOPs counted on the exported graphs).", ""]
        rows = []
        for v, t in res["ttft"].items():
            for pt in t["points"]:
                ms = pt["ms"]
                rows.append([v, f"{pt['batch']}x{pt['prompt_len']}", ms["base"], ms["kvp"], ms["kvp_prefill"],
                             ms["predictor_est"], ms["base_first_step"], ms["aux"], pt["kvp_speedup"],
                             pt["kvp_flops_ratio"], pt["kvp_efficiency"], pt["kvp_over_aux"], ms["base_step"]])
        lines += [md_table(["variant", "BxN", "base ms", "KVP ms", "kvp_prefill", "predictor (est.)", "base first step",
                            "aux ms", "KVP speedup", "FLOPs ratio", "efficiency", "KVP / aux", "decode step ms"],
                           rows, 2), ""]
    if res.get("humaneval"):
        lines += ["## HumanEval (greedy pass@1, sandboxed execution)", ""]
        rows = [[v, path, r["pass@1"], r["problems"]] for v, h in res["humaneval"].items()
                for path, r in h["paths"].items()]
        lines += [md_table(["variant", "path", "pass@1", "problems"], rows), ""]
    if p["gates"]:
        lines += ["## Gates", ""]
        rows = [[g["gate"], g["key"], g["value"], "pass" if g["ok"] else "FAIL"] for g in p["gates"]]
        lines += [md_table(["gate", "metric", "measured", ""], rows, 4), ""]
    return "\n".join(lines)
