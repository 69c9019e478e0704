"""A validation report's metrics: the flat, dotted keys gates address, built in one place.

A key is `CHECK.VARIANT.WHERE...NAME` (`metric_key`): `parity.int8.ok`,
`quality.fp32.kvp.delta_nll`, `ttft.int8.1x512.kvp_speedup`, `ttft.int8.auto.worst_vs_base`,
`coldstart.int8.1x128.kvp.first_token_ms`, `genai.fp32.1x512.kvp_vs_ours`. Every writer
(`report_metrics`, `genai_check.genai_metrics`) and every gate builder (the recipe's gates in
kvp_export/recipe.py) builds keys with `metric_key` and the names below, so a name is written
once. Imports no torch.
"""

from __future__ import annotations

from .gates import flatten

# The names gates use; each means one thing wherever it appears.
OK = "ok"  # parity: every check of the variant within its limit (1/0)
NLL = "nll"  # mean negative log-likelihood of the continuation, nats per token
DELTA_NLL = "delta_nll"  # a path's NLL minus the same variant's base NLL (what KVP costs)
DELTA_NLL_VS_FP32 = "delta_nll_vs_fp32"  # quality: a variant's NLL minus fp32's over the held-out pairs
NLL_VS_FP32 = "nll_vs_fp32"  # parity: a variant's NLL minus fp32's over parity's few pairs, per graph pair
FIRST_TOKEN_AGREEMENT = "first_token_agreement"  # share of prompts whose first token is the base's
KVP_SPEEDUP = "kvp_speedup"  # base prefill time / KVP time at one point
AUTO = "auto"  # the default mode (KVP from the crossover length on, the base below it)
WORST_VS_BASE = "worst_vs_base"  # the default mode's worst TTFT / the base's, over the lengths timed
FIRST_TOKEN_MS = "first_token_ms"  # cold start: a fresh process's time to the first token
COLDSTART_MS = (FIRST_TOKEN_MS, "load_ms", "first_call_ms", "warm_ms")  # a cold-start point's times


def metric_key(check: str, variant: str, *where: str) -> str:
    """The dotted key of one metric, e.g. metric_key("ttft", "int8", AUTO, WORST_VS_BASE)."""
    return ".".join((check, variant, *where))


def point(batch: int, prompt_len: int) -> str:
    """A measured point's part of a key: batch x prompt length, `1x512`."""
    return f"{batch}x{prompt_len}"


def vs_base(path: str) -> str:
    """A path's cold start or TTFT over the base's: `kvp_vs_base`, `auto_vs_base`."""
    return f"{path}_vs_base"


TTFT_POINT_KEYS = (KVP_SPEEDUP, "kvp_flops_ratio", "kvp_efficiency", "aux_speedup", "kvp_over_aux", vs_base(AUTO))


def _put(m: dict, values: dict, *key: str) -> None:
    m |= flatten(values, metric_key(*key) + ".")


def report_metrics(results: dict) -> dict[str, float]:
    """The gateable numbers of a validation's results: parity per variant and graph, quality per
    path, TTFT per point and the default mode, cold start, HumanEval, onnxruntime-genai."""
    m: dict[str, float] = {}
    for v, r in results.get("parity", {}).items():
        _put(m, {OK: r["ok"], **{f"{c['graph']}.{c['metric']}".replace(" ", "_"): c["value"] for c in r["checks"]}},
             "parity", v)
    fp32_q = results.get("quality", {}).get("fp32", {}).get("paths", {})
    for v, r in results.get("quality", {}).items():
        base_nll = r["paths"].get("base", {}).get(NLL)
        for path, vals in r["paths"].items():
            extra = {}
            if base_nll is not None and NLL in vals:
                extra[DELTA_NLL] = vals[NLL] - base_nll
            if v != "fp32" and NLL in fp32_q.get(path, {}):
                extra[DELTA_NLL_VS_FP32] = vals[NLL] - fp32_q[path][NLL]
            _put(m, dict(vals) | extra, "quality", v, path)
    crossover: dict[str, float] = {}
    for v, r in results.get("ttft", {}).items():
        for p in r["points"]:
            _put(m, {k: p[k] for k in TTFT_POINT_KEYS} | {f"ms_{k}": val for k, val in p["ms"].items()},
                 "ttft", v, point(p["batch"], p["prompt_len"]))
        if AUTO in r:  # the default mode: its worst TTFT against the base's, and where KVP starts to pay
            a = r[AUTO]
            _put(m, {WORST_VS_BASE: a[WORST_VS_BASE]}, "ttft", v, AUTO)
            _put(crossover, {k: val for k, val in (("measured", a["measured_crossover"]),
                                                    ("export", a["export_crossover"])) if val is not None},
                 "crossover", v)
    m |= crossover
    for v, r in results.get("coldstart", {}).items():
        points: dict[str, dict] = {point(1, p["prompt_len"]): {} for p in r["points"]}
        for p in r["points"]:
            points[point(1, p["prompt_len"])][p["path"]] = {
                k: p[k] for k in COLDSTART_MS} | {f"load_{g}_ms": ms for g, ms in p["graphs_ms"].items()}
        for at in points.values():  # KVP's and the default mode's cold start against the base's
            for path in ("kvp", AUTO):
                if path in at and "base" in at:
                    at[vs_base(path)] = at[path][FIRST_TOKEN_MS] / at["base"][FIRST_TOKEN_MS]
        _put(m, points, "coldstart", v)
    for v, r in results.get("humaneval", {}).items():
        _put(m, {path: {"pass@1": res["pass@1"]} for path, res in r["paths"].items()}, "humaneval", v)
    if results.get("genai"):
        from .genai_check import genai_metrics

        m |= genai_metrics(results)
    return m
