"""The reduced-rank predictor's quality per FLOP (issue 12): one pass over the calibration data, then a fit
per rank from the same statistics, each written as a predictor folder that `kvp eval` and `kvp export` read.

    python benchmarks/predictor_rank.py FIT_FOLDER OUT [--ranks full,192,128,96,64,32] [--stats FILE] [--eval 64]

FIT_FOLDER is a `kvp fit` output (hidden input); its aux, base, calibration data, sink and sources are
reused, so OUT/full is that fit again and OUT/rank-R is what `kvp fit --rank R` writes (same statistics;
`--stats` caches them, float64, between runs of this script). Prints per rank the predictor's FLOPs per
token and its held-out calibration error (mean over base layers of the relative K and V errors). With
`--eval N`, each is then scored as `kvp eval --n N` scores its KVP path (the same held-out pairs and
functions; the base and aux are loaded once, the base's own path runs once): continuation NLL, first-token
and greedy agreement with the base, and the paired difference from the first rank listed (so list `full`
first: the reference the others are judged against).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch

from kvp_export import data
from kvp_export.artifacts import atomic_dir, read_contract, read_manifest, write_manifest
from kvp_export.evaluate.quality import run_paths
from kvp_export.models import load
from kvp_export.predictor.module import KVPredictor
from kvp_export.predictor.ridge import RidgeStats, collect, new_predictor, solve
from kvp_export.runtime.kvp import SinkCache, prefill_full, prefill_kvp
from kvp_export.stage import calibration, load_model, ref_spec


def statistics_of(fit_folder: Path, cache: Path | None, calib: list[str] | None):
    man = read_manifest(fit_folder, "predictor")
    aux_folder = man["inputs"]["aux"]["path"]
    aux_man = read_contract(aux_folder, "aux")
    base, tok, _ = load_model(ref_spec(man["inputs"]["base"]))
    aux, _ = load(aux_folder)
    two_sided = man["recipe"]["sources"] == "two-sided"
    shape = (base, aux, aux_man.layer_map.map, man["input_mode"], aux_man.kept_layers if two_sided else None,
             1 if man["recipe"]["sources"] == "window" else 0)
    if cache and cache.is_file():
        return man, shape, torch.load(cache, weights_only=True)
    seqs, desc = calibration(tok, base, calib, man["inputs"]["calibration"]["tokens_requested"])
    if desc["tokens_sha256"] != man["inputs"]["calibration"]["tokens_sha256"]:
        raise SystemExit("the calibration tokens differ from the fit's (its --calib? another Python's stdlib?)")
    stats = collect(base, aux, seqs, new_predictor(*shape), man["sink_len"], progress=True)
    saved = {"xtx": stats.xtx, "xty": stats.xty, "yty": stats.yty, "tokens": stats.tokens}
    if cache:
        torch.save(saved, cache)
    return man, shape, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fit_folder", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ranks", default="full,192,128,96,64,32")
    ap.add_argument("--stats", type=Path, default=None)
    ap.add_argument("--calib", action="append", help="the fit's --calib, if it had one (default: built-in corpus)")
    ap.add_argument("--eval", type=int, default=0, help="held-out pairs (prompt 192 + continuation 64)")
    ap.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens compared with the base's (kvp eval's)")
    ap.add_argument("--export-kvp", action="store_true", help="write each rank's fp32 kvp_prefill.onnx to "
                    "OUT/onnx/RANK and check it against the PyTorch module (for predictor_profile.py --kvp)")
    a = ap.parse_args()
    man, shape, saved = statistics_of(a.fit_folder, a.stats, a.calib or None)
    rows = []
    for r in a.ranks.split(","):
        rank = None if r == "full" else int(r)
        pred = new_predictor(*shape, rank=rank)
        stats = RidgeStats(pred)
        stats.xtx, stats.xty, stats.yty, stats.tokens = saved["xtx"], saved["xty"], saved["yty"], saved["tokens"]
        report = solve(stats)
        folder = a.out / ("full" if rank is None else f"rank-{rank}")
        with atomic_dir(folder, overwrite=True) as tmp:
            pred.save(tmp)
            write_manifest(tmp, "predictor", inputs=man["inputs"],
                           recipe={**man["recipe"], **({"rank": rank} if rank else {})},
                           layer_map=man["layer_map"], input_mode=man["input_mode"], sink_len=man["sink_len"],
                           fit_report=report, calib_tokens=man["calib_tokens"], wall_seconds=0.0, step_seconds={})
        row = {"rank": r, "mflops_per_token": pred.flops_per_token() / 1e6,
               "val_rel_err_k": statistics.mean(report["val_rel_err_k"]),
               "val_rel_err_v": statistics.mean(report["val_rel_err_v"]), "folder": str(folder)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base, aux = shape[0], shape[1]
    if a.eval:
        tok = load_model(ref_spec(man["inputs"]["base"]))[1]
        prompts, conts = data.eval_pairs(tok, data.corpus_from_spec(None, "heldout"), a.eval, 192, 64)
        quality = kvp_quality(base, aux, {row["rank"]: KVPredictor.load(row["folder"]) for row in rows}, prompts,
                              conts, man["sink_len"], a.greedy_tokens)
        for row in rows:
            print(json.dumps({**row, **quality[row["rank"]]}), flush=True)
    if a.export_kvp:
        for row in rows[1:] if rows[0]["rank"] == "full" else rows:  # full: the export's own kvp_prefill
            print(json.dumps({"rank": row["rank"], **export_kvp(base, aux, Path(row["folder"]), a.out / "onnx" / row["rank"],
                                                               man["sink_len"])}),
                  flush=True)


def export_kvp(base, aux, folder: Path, out: Path, sink_len: int) -> dict:
    """The fp32 kvp_prefill graph of folder's predictor, and its largest relative error against the PyTorch
    module (predicted cache and next-step inputs) on one real 96-token prompt, in onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    from kvp_export.export.modules import KVPPrefill
    from kvp_export.export.to_onnx import export_graph, kvp_prefill_io

    pred = KVPredictor.load(folder)
    path = out / "kvp_prefill.onnx"
    out.mkdir(parents=True, exist_ok=True)
    export_graph("kvp_prefill", path, base, aux, pred, sink_len)
    ids = torch.randint(3, min(5000, base.config.vocab_size), (1, 96), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = KVPPrefill(base, aux, pred, sink_len)(ids, mask)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    names = kvp_prefill_io(len(pred.layer_map)).outputs
    rel = max(float(np.linalg.norm(g - w.numpy()) / max(np.linalg.norm(w.numpy()), 1e-30)) for g, w in zip(got, want))
    return {"graph": str(path), "max_rel_err_vs_pytorch": rel, "outputs": len(names)}


def kvp_quality(base, aux, preds: dict, prompts, conts, sink_len, greedy_tokens: int, batch: int = 8) -> dict:
    """Per rank, KVP scored as `kvp eval` scores it (evaluate.quality.run_paths: continuation NLL, first-token
    and greedy agreement with the base, which runs once), and against the first rank (the reference, `full`)
    on the same pairs: the paired NLL difference with its standard error, and the pairs whose first token
    only one of the two gets right (so a difference can be judged against the eval's own noise)."""
    sinks = SinkCache(base)

    def kvp(pred, prompt):
        return base, prefill_kvp(base, aux, pred, prompt, sink_len=sink_len, sinks=sinks, kv_source="predictor")

    prefills = {"base": lambda prompt: (base, prefill_full(base, prompt)),
                **{r: functools.partial(kvp, pred) for r, pred in preds.items()}}
    with torch.no_grad():
        runs = run_paths(prefills, prompts, conts, greedy_tokens=greedy_tokens, batch=batch)
    n, ref = len(prompts), next(iter(preds))
    right = {r: runs.first[r] == runs.first["base"] for r in preds}
    out = {}
    for r in preds:
        d = (runs.nll[r] - runs.nll[ref]) / conts.shape[1]  # per pair, nats per token
        out[r] = {**runs.summary(r, n, conts.shape[1]), "nll_minus_ref": float(d.mean()),
                  "nll_minus_ref_se": float(d.std() / n**0.5),
                  "first_only_ref_right": int((right[ref] & ~right[r]).sum()),
                  "first_only_this_right": int((right[r] & ~right[ref]).sum())}
        out[r].pop("prefill_seconds_total")  # a shared machine's
    return out


if __name__ == "__main__":
    main()
