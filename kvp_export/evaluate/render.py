"""report.md from the eval payload: the comparison table first, then the detail behind it."""

from __future__ import annotations

from kvp_validate.report import md_table

LABELS = {"base": "base", "aux": "aux alone", "kvp": "KVP", "no_prompt": "no prompt", "mean_kv": "mean KV"}


def quality_table(results: dict) -> str:
    g = results["data"]["greedy_tokens"]
    paths = results["paths"]
    base_nll = paths["base"]["nll"]
    headers = ["path", "NLL", "ΔNLL vs base", "first-token agreement", f"greedy-{g} agreement",
               f"greedy-{g} exact", "prefill GFLOPs", "FLOPs ratio"]
    rows = [
        [LABELS[p], r["nll"], r["nll"] - base_nll, r["first_token_agreement"], r[f"greedy{g}_agreement"],
         r[f"greedy{g}_exact"], r["prefill_flops"] / 1e9, r["flops_ratio_vs_base"]]
        for p, r in paths.items()
    ]
    return md_table(headers, rows)


def kv_error_table(results: dict, layer_map: list[int] | None) -> str:
    err = results["kv_rel_error"]
    rows = [[i, layer_map[i] if layer_map else "-", k, v] for i, (k, v) in enumerate(zip(err["k"], err["v"]))]
    rows.append(["mean", "", err["k_mean"], err["v_mean"]])
    return md_table(["base layer", "aux layer", "K rel. error", "V rel. error"], rows)


def stage_table(stages: dict) -> str:
    rows = [[name, s["wall_seconds"], s["calib_tokens"]] for name, s in stages.items()]
    return md_table(["stage", "wall seconds", "calibration tokens"], rows, digits=1)


def markdown(payload: dict) -> str:
    res, m, d = payload["results"], payload["models"], payload["data"]
    layer_map = (m.get("layer_map") or {}).get("map")
    held = d["heldout"]
    return "\n\n".join([
        "# KV Prediction report",
        f"Base `{m['base']}` ({res['base_layers']} layers); aux `{m['aux']}` ({res['aux_layers']} layers, "
        f"layer map {(m.get('layer_map') or {}).get('kind', '?')}); predictor `{payload['predictor']}` "
        f"(input {m['input_mode']}). Sink length: {payload['sink_len']} (computed exactly by the base).",
        f"## Quality and prefill cost\n\n{d['sequences']} held-out sequences: prompt {d['prompt_len']} tokens, "
        f"continuation {d['cont_len']} tokens (NLL in nats per token, teacher-forced). Agreement is with the "
        "base's own tokens. FLOPs ratio = base prefill FLOPs / the path's.",
        quality_table(res),
        "## Per-layer K/V relative error\n\nPredicted vs true base KV, keys before RoPE, sink positions excluded.",
        kv_error_table(res, layer_map),
        "## Data\n\n"
        f"Held-out corpus: {held.get('documents')} documents, {held.get('chars')} characters, "
        f"sha256 `{held.get('sha256')}`; split: {(held.get('split') or {}).get('name', '-')}.",
        "## Stage wall times",
        stage_table(payload["stages"]),
    ])
