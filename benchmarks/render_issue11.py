#!/usr/bin/env python3
"""Summarise one benchmarks/issue11_gpu.sh run (its WORK folder, or a copy of its manifests, reports,
train logs and HumanEval files) as OUT.json and OUT.md: HumanEval pass@1 per path, held-out NLL and
agreement per path (with TAIL, the tailed paths too), the held-out curves of the trainings, train vs held-out loss at the kept step,
minutes per stage and, where the run exported them (ONNX_HE), the int8 exports' validation (parity,
HumanEval on the first N problems through onnxruntime, beside the GPU run's score on the same N).

  python benchmarks/render_issue11.py WORK OUT --machine "NVIDIA H200 ..." --date 2026-11-30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvp_validate.contract import MANIFEST, REPORT_JSON

HE_PATHS = {"base": "base", "aux_healed": "aux alone, healed", "aux_unhealed": "aux alone, unhealed", "aux_baseline": "aux alone, OE-LP baseline (CE fine-tuned)",
            "kvp_ridge": "KVP closed form (aux + ridge)", "kvp_trained": "KVP trained"}
ONNX = {"ridge": "kvp_ridge", "kvp": "kvp_trained"}  # export name -> the GPU HumanEval path it exports
EVALS = {"ridge": "kvp_ridge", "kvp": "kvp_trained"}  # eval folder name -> its KVP path


def he_label(path: str) -> str:
    """A HumanEval path's label; `<kvp path>_tail<W>` is that path with `--tail W`."""
    head, _, w = path.partition("_tail")
    return f"{HE_PATHS[head]}, tail {w}" if w else HE_PATHS.get(path, path)


def aux_run(manifest: dict) -> str:
    """The aux alone's path name: healed or not (`kvp derive --heal`)."""
    return "aux_unhealed" if manifest["recipe"]["heal"] == "none" else "aux_healed"


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def train_curve(log: Path, metric: str, window: int = 100) -> list[dict]:
    """Per held-out evaluation: its terms, and the training batches' mean of the same term over the
    `window` steps up to it (what "train loss at that step" means here)."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    out = []
    for r in rows:
        if f"heldout_{metric}" not in r:
            continue
        tail = [x[metric] for x in rows if r["step"] - window < x["step"] <= r["step"]]
        out.append({"step": r["step"], "heldout": {k.removeprefix("heldout_"): v for k, v in r.items()
                                                  if k.startswith("heldout_") and k != "heldout_best"},
                    f"train_{metric}_mean_last_{window}": sum(tail) / len(tail)})
    return out


def he_summary(folder: Path) -> dict:
    """Every HumanEval path's run record, relative to the base's pass@1 (what humaneval_gpu.py's
    summary.json holds once every path ran; built here from the per-path files, which a run cut
    short also leaves), the base first."""
    runs = {f.stem: read(f)["run"] for f in sorted(folder.glob("*.json")) if f.name != "summary.json"}
    runs = dict(sorted(runs.items(), key=lambda kv: kv[0] != "base"))
    base = runs.get("base", {}).get("pass_at_1")
    for r in runs.values():
        r["relative_to_base"] = r["pass_at_1"] / base if base else None
    return runs


def step_rates(log: Path) -> list[float]:
    """tokens/s of the steps a `kvp train` log line reports (one every twentieth of the run)."""
    if not log.exists():
        return []
    return [float(line.rsplit("|", 1)[1].split()[0].replace(",", "")) for line in log.read_text().splitlines()
            if "train step" in line and "tok/s" in line]


def throughput(work: Path) -> dict:
    """Training tokens/s per run (NPROC > 1: the one-GPU probe `kvp-1gpu` beside the DDP runs): the
    average over the run (train_seconds, loading excluded) and the sampled steps' median."""
    out = {}
    for name in ("kvp-1gpu", "kvp", "baseline"):
        m = work / name / MANIFEST
        if not m.exists():
            continue
        t = read(m)["training"]
        rates = sorted(step_rates(work / "logs" / f"train-{name.replace('kvp-1gpu', 'probe')}.log"))
        out[name] = {"world_size": t.get("world_size"), "strategy": t.get("strategy"), "steps": t["steps"],
                     "tokens": t["tokens"], "train_seconds": t["train_seconds"],
                     "tokens_per_second": round(t["tokens"] / t["train_seconds"]),
                     "sampled_steps_tokens_per_second": rates,
                     "sampled_median": rates[len(rates) // 2] if rates else None}
    return out


def candidates(work: Path) -> dict:
    """The auxes tried before training (HEALS): kept layers, healing, and their closed form's eval."""
    out = {}
    for c in sorted(work.glob("cand-*")):
        if not (c / "eval" / REPORT_JSON).exists():
            continue
        am, r = read(c / "aux" / MANIFEST), read(c / "eval" / REPORT_JSON)["results"]
        out[c.name.removeprefix("cand-")] = {"kept_layers": am["kept_layers"], "select": am["recipe"].get("select"),
                                             "aux": r["paths"]["aux"], "kvp": r["paths"]["kvp"],
                                             "kv_rel_error": {k: r["kv_rel_error"][k] for k in ("k_mean", "v_mean")}}
    return out


def summarise(work: Path, machine: str, date: str) -> dict:
    he = he_summary(work / "humaneval")
    # the OE-LP baseline is optional (BASELINE=0), and so are the tailed evals (TAIL)
    man = {k: read(work / k / MANIFEST) for k in ("aux", "ridge", "kvp", "baseline") if (work / k / MANIFEST).exists()}
    evals = {d.name.removeprefix("eval-"): read(d / REPORT_JSON)["results"] for d in sorted(work.glob("eval-*"))
             if (d / REPORT_JSON).exists()}
    emin = {k: round(read(work / f"eval-{k}" / MANIFEST)["wall_seconds"] / 60, 2) for k in evals}
    quality = {
        "base": evals["ridge"]["paths"]["base"],
        "no_prompt": evals["ridge"]["paths"]["no_prompt"],
        "mean_kv": evals["ridge"]["paths"]["mean_kv"],
        aux_run(man["aux"]): evals["ridge"]["paths"]["aux"],
        **({"aux_baseline_oe_lp": evals["baseline"]["paths"]["aux"]} if "baseline" in evals else {}),
        "kvp_ridge": evals["ridge"]["paths"]["kvp"],
        "aux_after_kvp_training": evals["kvp"]["paths"]["aux"],
        "kvp_trained": evals["kvp"]["paths"]["kvp"],
    }
    kv_error = {"kvp_ridge": {k: evals["ridge"]["kv_rel_error"][k] for k in ("k_mean", "v_mean")},
                "kvp_trained": {k: evals["kvp"]["kv_rel_error"][k] for k in ("k_mean", "v_mean")}}
    for name, r in evals.items():  # eval-<ridge|kvp>-tail<W>
        head, _, w = name.partition("-tail")
        if w:
            quality[f"{EVALS[head]}_tail{w}"] = r["paths"]["kvp"] | {"prefill_flops_vs_tail0": round(
                r["paths"]["kvp"]["prefill_flops"] / evals[head]["paths"]["kvp"]["prefill_flops"], 3)}
    training = {}
    for name, metric in (("kvp", "ce_base"), ("baseline", "ce_aux")):
        if name not in man:
            continue
        t = man[name]["training"]
        curve = train_curve(work / name / "train_log.jsonl", metric)
        best = next(c for c in curve if c["step"] == t["heldout"]["best_step"])
        training[name] = {
            "tokens": t["tokens"], "steps": t["steps"], "planned_steps": t.get("planned_steps"),
            "unique_tokens": t["unique_tokens"], "epochs": t["epochs"], "stopped": t.get("stopped"),
            "train_minutes": round(t["train_seconds"] / 60, 2),
            "tokens_per_second": round(t["tokens"] / t["train_seconds"]),
            "heldout": t["heldout"], "metric": metric,
            "at_kept_step": {"step": best["step"], "heldout": best["heldout"][metric],
                             "train_mean_last_100_steps": best[f"train_{metric}_mean_last_100"]},
            "curve": curve,
            "recipe": {k: man[name]["recipe"].get(k) for k in ("batch", "accum", "world_size", "seq_len", "lr",
                                                               "warmup_steps",
                                                               "min_lr_ratio", "lambda_c", "kl", "precision",
                                                               "eval_every", "eval_tokens", "patience")},
        }
    return {
        "model": "qwen2.5-coder-0.5b", "keep": man["aux"]["recipe"]["keep"], "date": date, "machine": machine,
        "versions": man["kvp"]["versions"],
        "corpus": {"name": "pypi-code", "sha256": man["kvp"]["inputs"]["data"]["corpus"]["sha256"],
                   "tokens_qwen": man["ridge"]["inputs"]["calibration"]["corpus"]["tokens"]},
        "tokens": {"calibration": man["ridge"]["calib_tokens"],
                   **{f"train_{k}": t["tokens"] for k, t in training.items()}},
        "minutes": {"derive_gpu": round(man["aux"]["wall_seconds"] / 60, 2),
                    "fit_gpu": round(man["ridge"]["wall_seconds"] / 60, 2),
                    **{f"train_{k}": t["train_minutes"] for k, t in training.items()},
                    **{f"humaneval_{k}": round(v["seconds"]["total_with_load"] / 60, 2) for k, v in he.items()},
                    **{f"eval_{k}": v for k, v in emin.items()}},
        "aux": {k: man["aux"]["recipe"].get(k) for k in ("select", "heal")} | {"kept_layers": man["aux"]["kept_layers"]},
        "healing_rel_drift": [round(x["rel_drift"], 3) for x in man["aux"]["healing"].get("layers", [])],
        "candidates": candidates(work), "throughput": throughput(work),
        "humaneval": he, "quality": quality, "kv_rel_error": kv_error, "training": training,
        "onnx": {name: o for name, path in ONNX.items() if (o := onnx_summary(work, name, path))},
        # benchmarks/tail_agreement.py (TAILS): KVP at several tails on the held-out pairs
        "tails": {EVALS[f.stem.removeprefix("tails-")]: read(f)["paths"] for f in sorted(work.glob("tails-*.json"))},
    }


def first_n_passed(work: Path, path: str, n: int) -> int | None:
    """Problems the GPU run of `path` passed among HumanEval/0 .. n-1."""
    f = work / "humaneval" / f"{path}.json"
    if not f.exists():
        return None
    probs = read(f)["problems"]
    return sum(probs[f"HumanEval/{i}"]["passed"] > 0 for i in range(n))


def onnx_summary(work: Path, name: str, he_path: str) -> dict | None:
    """The int8 export of `name` as validated: parity checks, HumanEval per onnxruntime path, seconds."""
    rep = work / f"validate-{name}" / "report.json"
    if not rep.exists():
        return None
    r = read(rep)
    exp = read(work / f"onnx-{name}" / "manifest.json")
    he = r["results"].get("humaneval", {}).get("int8", {})
    n = next((p["problems"] for p in he.get("paths", {}).values()), None)
    gpu = {"base": "base", "kvp": he_path, "aux": None}
    return {
        "export_minutes": round(exp["wall_seconds"] / 60, 2) if "wall_seconds" in exp else None,
        "validate_seconds": r["check_seconds"], "machine": r["machine"],
        "parity_ok": r["results"]["parity"]["int8"]["ok"],
        "parity": [{k: c.get(k) for k in ("graph", "metric", "value", "limit", "ok")}
                   for c in r["results"]["parity"]["int8"]["checks"]],
        "humaneval": {mode: {"passed": p["passed"], "problems": p["problems"], "pass@1": p["pass@1"],
                             "max_new_tokens": he.get("max_new_tokens"),
                             "gpu_bf16_same_problems": first_n_passed(work, gpu[mode], n) if gpu[mode] else None}
                      for mode, p in he.get("paths", {}).items()},
        "crossover": exp.get("crossover"),
    }


def f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(s: dict) -> str:
    he, q, tr = s["humaneval"], s["quality"], s["training"]
    lines = [f"## {s['model']}, keep {s['keep']:.2f}, on `pypi-code` ({s['date']})", "",
             f"Machine: {s['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ".",
             f"Tokens: calibration {s['tokens']['calibration']:,} (derive + fit); training "
             + " and ".join(f"{v:,} for {k.removeprefix('train_')}" for k, v in s["tokens"].items() if k != "calibration")
             + f" (corpus: {s['corpus']['tokens_qwen']['calib']:,} calibration / "
             f"{s['corpus']['tokens_qwen']['heldout']:,} held-out tokens with Qwen's tokenizer).", "",
             "### HumanEval pass@1 (164 problems, greedy, bf16, 384 new tokens at most)", "",
             "| path | passed | pass@1 | relative to base | generate s | sandbox |", "|---|---|---|---|---|---|"]
    for k, r in he.items():
        lines.append(f"| {he_label(k)} | {r['passed']}/{r['n_problems']} | {f(r['pass_at_1'])} | "
                     f"{f(r.get('relative_to_base'), 2)} | {r['seconds']['generate']:.0f} | "
                     f"{', '.join(r['sandbox']['layers'])} |")
    lines += ["", "### Held-out code (64 pairs from the 12 held-out projects, prompt 192 + 64 tokens, fp32)", "",
              "| path | NLL | ΔNLL vs base | first-token agreement | greedy-32 agreement | prefill FLOPs vs base |",
              "|---|---|---|---|---|---|"]
    for k, r in q.items():
        lines.append(f"| {k} | {f(r['nll'])} | {f(r['nll'] - q['base']['nll'])} | {f(r['first_token_agreement'])} | "
                     f"{f(r['greedy32_agreement'])} | {f(1 / r['flops_ratio_vs_base'], 3)} |")
    for name, t in s.get("tails", {}).items():
        lines += ["", f"### `{name}` with an exact tail of W prompt tokens (the same 64 pairs, fp32)", "",
                  "| W | NLL | first-token agreement | greedy-32 agreement | greedy-32 exact | prefill FLOPs vs base |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k.removeprefix('tail')} | {f(r['nll'])} | {f(r['first_token_agreement'])} | "
                  f"{f(r['greedy32_agreement'])} | {f(r['greedy32_exact'])} | {f(r['prefill_flops_vs_base'])} |"
                  for k, r in t.items()]
    lines += ["", "### Training: held-out vs train loss", "",
              "| run | metric | tokens | epochs | kept step | held-out at it | train (mean of the 100 steps "
              "before it) | gap | tokens/s | stopped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in tr.items():
        a = t["at_kept_step"]
        lines.append(f"| {name} | {t['metric']} | {t['tokens']:,} | {t['epochs']:.2f} | {a['step']}/{t['planned_steps']} | "
                     f"{f(a['heldout'])} | {f(a['train_mean_last_100_steps'])} | "
                     f"{f(a['heldout'] - a['train_mean_last_100_steps'])} | {t['tokens_per_second']:,} | "
                     f"{t['stopped'] or 'no'} |")
    for name, t in tr.items():
        lines += ["", f"Held-out {t['metric']} of `{name}` by step: " +
                  ", ".join(f"{c['step']}: {c['heldout'][t['metric']]:.3f}" for c in t["curve"])]
    for name, o in s.get("onnx", {}).items():
        lines += ["", f"### ONNX int8 export of `{name}` through onnxruntime (CPU: {o['machine'].get('cpu')})", "",
                  f"Parity ok: {o['parity_ok']}; export {o['export_minutes']} min; validation seconds "
                  f"{o['validate_seconds']}.", "",
                  "| onnxruntime path | passed | pass@1 | the GPU bf16 run, same problems |", "|---|---|---|---|"]
        for mode, h in o["humaneval"].items():
            lines.append(f"| {mode} | {h['passed']}/{h['problems']} | {f(h['pass@1'])} | "
                         f"{'-' if h['gpu_bf16_same_problems'] is None else h['gpu_bf16_same_problems']} |")
        lines += ["", "| graph | metric | value | limit | ok |", "|---|---|---|---|---|"]
        lines += [f"| {c['graph']} | {c['metric']} | {c['value']:.4g} | {c['limit']} | {c['ok']} |" for c in o["parity"]]
    if s.get("candidates"):
        lines += ["", "### The auxes tried (closed form on the same 64 pairs; the best greedy-32 agreement trained)", "",
                  "| heal | kept layers | aux alone NLL | aux first-token | KVP NLL | KVP first-token | KVP greedy-32 | "
                  "K / V rel. error |", "|---|---|---|---|---|---|---|---|"]
        for h, c in s["candidates"].items():
            lines.append(f"| {h} | {','.join(map(str, c['kept_layers']))} | {f(c['aux']['nll'])} | "
                         f"{f(c['aux']['first_token_agreement'])} | {f(c['kvp']['nll'])} | "
                         f"{f(c['kvp']['first_token_agreement'])} | {f(c['kvp']['greedy32_agreement'])} | "
                         f"{f(c['kv_rel_error']['k_mean'])} / {f(c['kv_rel_error']['v_mean'])} |")
    if s.get("throughput"):
        lines += ["", "### Training throughput (tokens/s)", "",
                  "| run | processes | steps | tokens | average (train seconds) | median of the sampled steps |",
                  "|---|---|---|---|---|---|"]
        for name, t in s["throughput"].items():
            median = "-" if t["sampled_median"] is None else f"{t['sampled_median']:,.0f}"
            lines.append(f"| {name} | {t['world_size']} | {t['steps']} | {t['tokens']:,} | {t['tokens_per_second']:,} "
                         f"({t['train_seconds']:.0f} s) | {median} |")
    lines += ["", "Minutes: " + ", ".join(f"{k} {v}" for k, v in s["minutes"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path, help="OUT.json and OUT.md are written")
    p.add_argument("--machine", required=True)
    p.add_argument("--date", required=True)
    a = p.parse_args()
    s = summarise(a.work, a.machine, a.date)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    md = a.out.with_name(a.out.name + ".md")  # not with_suffix: "keep-0.50" has a dot
    a.out.with_name(a.out.name + ".json").write_text(json.dumps(s, indent=1) + "\n")
    md.write_text(markdown(s))
    print(md.read_text())


if __name__ == "__main__":
    main()
