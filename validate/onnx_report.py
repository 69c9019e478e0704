"""`kvp validate DIR`: parity, accuracy and TTFT of an ONNX export, as report.json + report.md.

The report folder is written atomically. report.json carries every measurement, a flat
`metrics` dict that gates address, and the gate results; the exit code is non-zero when a
gate fails (see cli.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from .artifact import OnnxArtifact
from .coldstart import run_coldstart
from .contract import now
from .errors import KvpError, check_choice
from .gates import Gate, evaluate
from .machine import describe, machine
from .metrics import report_metrics
from .options import CHECKS, DEFAULT_CHECKS
from .options import DEFAULTS as D
from .parallel import plan, run_parallel
from .parity import run_parity
from .quality import quality_job
from .report import gates_table, md_table, write_report_folder
from .runtime import verify_variants
from .ttft import run_ttft

SESSION_MEMORY_FACTOR = 2  # a session holds its graphs' weights and their pre-packed copies
__all__ = ["CHECKS", "DEFAULT_CHECKS", "validate_onnx"]


def validate_onnx(folder: str | Path, out: str | Path, *, variants: list[str] | None = None,
                  checks: tuple[str, ...] = DEFAULT_CHECKS, gates: list[str] | None = None,
                  threads: int = D["threads"], quality_n: int | None = None,
                  greedy_tokens: int = D["greedy_tokens"], lengths=D["lengths"], batches=D["batches"],
                  warmup: int = D["warmup"], repeats: int = D["repeats"], humaneval_limit: int | None = None,
                  tolerances: dict | None = None, coldstart_lengths: tuple[int, ...] = D["coldstart_lengths"],
                  coldstart_runs: int = D["coldstart_runs"], genai_lengths: tuple[int, ...] = D["genai_lengths"],
                  genai_pairs: int | None = D["genai_pairs"],
                  overwrite: bool = False,
                  progress: bool = False, allow_unsafe_execution: bool = False) -> dict:
    """Run the checks on each variant and write the report folder `out`; return the payload.

    HumanEval executes generated code: refused before anything runs where the host has no OS
    sandbox, unless allow_unsafe_execution (sandbox.py)."""
    parsed = [Gate.parse(g) for g in gates or []]
    for c in checks:
        check_choice("check", c, CHECKS)
    if "humaneval" in checks:
        from .sandbox import layers

        layers(allow_unsafe_execution)
    out = Path(out)
    if out.exists() and not overwrite:
        raise KvpError(f"output folder exists: {out} (pass --overwrite to replace it)")
    art = OnnxArtifact.open(folder)
    variants = variants or art.variants
    for v in variants:
        art.check_variant(v)
    art.tokenizer()  # a mismatched tokenizer fails before any measurement
    verify_variants(art, variants)  # every graph hashed once, before any check (workers get the digests)
    if "genai" in checks:  # onnxruntime-genai installed and every variant's genai-kvp/ there, before any work
        from .genai_check import check_ready

        check_ready(art, variants)
    t0 = time.perf_counter()
    results: dict = {c: {} for c in checks}
    # fp32 first: a quantized variant's parity is judged against the fp32 graphs, which must pass first
    variants = sorted(variants, key=lambda v: v != "fp32")
    fp32_outputs: dict = {}  # the fp32 graphs' outputs on parity's pairs, computed once for every variant
    seconds: dict[str, dict[str, float]] = {c: {} for c in checks}

    def timed(check: str, v: str, fn):
        t = time.perf_counter()
        results[check][v] = fn()
        seconds[check][v] = round(time.perf_counter() - t, 1)

    if "quality" in checks:
        # throughput work: every variant at once in worker processes (parallel.py), before the
        # timing checks, which then run alone
        workers, per_worker = plan(len(variants), threads, SESSION_MEMORY_FACTOR * max(art.variant_bytes(v) for v in variants))
        # the slowest variant first (its TTFT at the export's longest crossover length is the cost
        # proxy), so the longest job never starts last (measured: BENCHMARKS.md, "The default
        # recipe, second pass")
        order = sorted(variants, key=lambda v: -_cost(art, v))
        jobs = {v: (quality_job, (folder, v, quality_n, greedy_tokens, per_worker)) for v in order}
        for v, (res, secs) in run_parallel(jobs, workers, f"quality ({workers} workers)", progress,
                                           unit="variant").items():
            results["quality"][v], seconds["quality"][v] = res, secs
        results["quality"] = {v: results["quality"][v] for v in variants}
    for v in variants:
        if "parity" in checks:
            timed("parity", v, lambda v=v: run_parity(art, v, threads, (tolerances or {}).get(v),
                                                  fp32=results["parity"].get("fp32"), cache=fp32_outputs))
        if "ttft" in checks:
            timed("ttft", v, lambda v=v: run_ttft(art, v, lengths=lengths, batches=batches, threads=threads,
                                              warmup=warmup, repeats=repeats, progress=progress))
        if "coldstart" in checks:
            timed("coldstart", v, lambda v=v: run_coldstart(folder, v, lengths=coldstart_lengths, threads=threads,
                                                        repeats=min(repeats, 3), runs=coldstart_runs,
                                                        progress=progress))
        if "genai" in checks:
            from .genai_check import run_genai

            timed("genai", v, lambda v=v: run_genai(art, v, lengths=genai_lengths, threads=threads, warmup=warmup,
                                                repeats=repeats, quality_n=genai_pairs, greedy_tokens=greedy_tokens,
                                                progress=progress))
        if "humaneval" in checks:
            from .humaneval_onnx import run_humaneval_onnx

            timed("humaneval", v, lambda v=v: run_humaneval_onnx(art, v, limit=humaneval_limit, threads=threads,
                                                             progress=progress, allow_unsafe=allow_unsafe_execution))
    metrics = report_metrics(results)
    gate_results = evaluate(parsed, metrics)
    payload = {
        "export": str(Path(folder).resolve()),
        "machine": machine(),
        "created": now(),
        "seconds": round(time.perf_counter() - t0, 1),
        "check_seconds": seconds,
        "variants": variants,
        "model": art.model,
        "results": results,
        "metrics": metrics,
        "gates": gate_results,
        "ok": all(g["ok"] for g in gate_results),
    }
    write_report_folder(out, payload, markdown(payload), overwrite)
    return payload


def _cost(art, variant: str) -> float:
    """A variant's relative compute cost: base + KVP time at the longest length the export timed
    for its crossover (0 when it timed none)."""
    points = c.points if (c := art.manifest.crossover.get(variant)) else []
    if not points:
        return 0.0
    p = max(points, key=lambda q: q["prompt_len"])
    return sum(v for k, v in p.items() if k.endswith("_ms"))


def markdown(p: dict) -> str:
    mach = p["machine"]
    lines = [f"# Validation of {p['export']}", "",
             f"{p['created']} on {describe(mach)}, onnxruntime {mach.get('onnxruntime')}; {p['seconds']} s.", ""]
    res = p["results"]
    if res.get("parity"):
        lines += ["## Parity", "",
                  "fp32 against the PyTorch reference; quantized variants against the fp32 graphs on the same "
                  "inputs (KL, top-1, NLL delta), with their errors against the PyTorch reference reported "
                  "(limit -) but not gated, since they depend on the CPU's int8 kernels.", ""]
        rows = [[v, c["graph"], c["metric"], c["value"], c["limit"],
                 ("ok" if c["ok"] else "FAIL") if c["limit"] is not None else "reported"]
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
    sweeps = {v: t["auto"] for v, t in res.get("ttft", {}).items() if "auto" in t}
    if sweeps:
        lines += ["## Default mode (auto) against the base, batch 1", "",
                  "auto = KVP from the crossover prompt length on (measured at export, on the exporting machine), "
                  "the base through its decoder below it. `measured crossover` is where KVP started to win here.", ""]
        rows = [[v, sw["export_crossover"], sw["measured_crossover"], sw["worst_vs_base"]] for v, sw in sweeps.items()]
        lines += [md_table(["variant", "export crossover", "measured crossover", "worst auto / base"], rows, 2), ""]
        rows = [[v, p["prompt_len"], p["base_ms"], p["kvp_ms"], p["auto_ms"], p["auto_ms"] / p["base_ms"]]
                for v, sw in sweeps.items() for p in sw["points"]]
        lines += [md_table(["variant", "prompt", "base ms", "KVP ms", "auto ms", "auto / base"], rows, 2), ""]
    if res.get("coldstart"):
        lines += ["## Cold start (a fresh process to the first token)", "",
                  "first token = open the export + create the sessions the path needs to generate (prefill graph "
                  "and decoder, concurrently) + the first call; Python's start and imports are not included.", ""]
        rows = [[v, f"1x{p['prompt_len']}", p["path"], p["first_token_ms"], p["load_ms"],
                 ", ".join(f"{g} {ms:.0f}" for g, ms in p["graphs_ms"].items()), p["first_call_ms"], p["warm_ms"]]
                for v, c in res["coldstart"].items() for p in c["points"]]
        lines += [md_table(["variant", "BxN", "path", "first token ms", "load ms (wall)", "per graph ms",
                            "first call ms", "warm ms"], rows, 1), ""]
    if res.get("humaneval"):
        lines += ["## HumanEval (greedy pass@1, sandboxed execution)", ""]
        rows = [[v, path, r["pass@1"], r["problems"]] for v, h in res["humaneval"].items()
                for path, r in h["paths"].items()]
        lines += [md_table(["variant", "path", "pass@1", "problems"], rows), ""]
        used = sorted({", ".join(r["sandbox"]["layers"]) for h in res["humaneval"].values()
                       for r in h["paths"].values() if "sandbox" in r})
        lines += [f"Sandbox layers: {u}" for u in used] + ([""] if used else [])
    if res.get("genai"):
        from .genai_check import genai_markdown

        lines += genai_markdown(res)
    if p["gates"]:
        lines += ["## Gates", "", gates_table(p["gates"]), ""]
    return "\n".join(lines)
