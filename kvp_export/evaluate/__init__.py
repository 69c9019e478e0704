"""eval: a predictor folder measured on held-out text, written as report.json + report.md.

KVP is shown beside the base, the aux alone and the two trivial baselines (no prompt,
mean KV): a predictor that loses to those is worse than useless (docs/method.md,
"Trivial baselines").
"""

from __future__ import annotations

from pathlib import Path

from kvp_validate.protocol import min_kvp_len
from kvp_validate.report import write_report

from .. import data
from ..artifacts import atomic_dir, check_output_dir, read_manifest, write_manifest
from ..config import SEED, EvalConfig, configure
from ..distributed import resolve_device
from ..errors import KvpError
from ..runtime.kvp import check_context
from ..runtime.pipeline import KVPPipeline
from ..stage import Clock, check_paths, compute_device, seed_all
from .quality import evaluate
from .render import markdown


def run_eval(predictor: str | Path, out: str | Path, config: EvalConfig | None = None, *, aux: str | None = None,
             base: str | None = None, heldout: list[str] | None = None, overwrite: bool = False, seed: int = SEED,
             progress: bool = True, **options) -> Path:
    """Evaluate `predictor` (a fit folder) on n held-out (prompt, continuation) pairs; write folder `out`.

    `config` (or `options`, its fields by name, e.g. n=8) says how many pairs of which lengths.
    Files given as `heldout` are evaluated whole unless `heldout_split` is "heldout". `device`
    "cuda" runs every path on the GPU, in float32 as on the CPU."""
    clock = Clock()
    out = check_output_dir(out, overwrite)
    (cfg,) = configure(options, (EvalConfig, config))
    n, prompt_len, cont_len, greedy_tokens, batch = cfg.n, cfg.prompt_len, cfg.cont_len, cfg.greedy_tokens, cfg.batch
    check_paths(heldout, "held-out")
    seed_all(seed)
    with clock.step("load"):
        pipe = KVPPipeline.from_predictor(predictor, aux=aux, base=base, device=resolve_device(cfg.device))
    if prompt_len < min_kvp_len(pipe.sink_len, cfg.tail):
        raise KvpError(f"prompt-len must be >= {min_kvp_len(pipe.sink_len, cfg.tail)} for KVP with a "
                       f"{pipe.sink_len}-token sink and a tail of {cfg.tail}")
    with clock.step("data"):
        user_files = bool(heldout) and data.named_corpus(heldout) is None
        split = cfg.heldout_split if user_files else "heldout"
        corpus = data.corpus_from_spec(list(heldout) if heldout else None, split)
        prompts, conts = data.eval_pairs(pipe.tokenizer, corpus, n, prompt_len, cont_len)
    check_context(pipe.base, prompts, extra=max(cont_len, greedy_tokens))
    with clock.step("evaluate"), compute_device(cfg.device) as dev:
        results = evaluate(pipe.base, pipe.aux, pipe.predictor, prompts.to(dev), conts.to(dev),
                           sink_len=pipe.sink_len, greedy_tokens=greedy_tokens, batch=batch, tail=cfg.tail,
                           progress=progress)
    timing = clock.record()
    payload = _payload(pipe, predictor, base, results, corpus.description, timing)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_report(tmp, payload, markdown(payload))
        write_manifest(tmp, "report", inputs={"predictor": payload["predictor"], "heldout": corpus.description},
                       # the pairs' shape always, then every other option that differs from its default
                       # (a new EvalConfig field is recorded with no edit here, as fit does)
                       recipe={"n": n, "prompt_len": prompt_len, "cont_len": cont_len,
                               "greedy_tokens": greedy_tokens, "heldout_split": split, "seed": seed,
                               **cfg.model_dump(exclude={"n", "prompt_len", "cont_len", "greedy_tokens",
                                                         "heldout_split", "batch"}, exclude_defaults=True)},
                       calib_tokens=0, heldout_tokens=int(prompts.numel() + conts.numel()), **timing)
    return out


def _payload(pipe: KVPPipeline, predictor, base: str | None, results: dict, heldout: dict, timing: dict) -> dict:
    return {
        "predictor": str(Path(predictor).resolve()),
        "models": {
            "base": base or pipe.manifest["inputs"]["base"]["spec"],
            "aux": str(pipe.aux_dir),
            "layer_map": pipe.manifest.get("layer_map"),
            "input_mode": pipe.predictor.input_mode,
        },
        "sink_len": pipe.sink_len,
        "results": results,
        "data": {"heldout": heldout, **results["data"]},
        "stages": _stage_times(pipe, timing),
    }


def _stage_times(pipe: KVPPipeline, eval_timing: dict) -> dict:
    """Wall time and calibration tokens of each stage, where its manifest records them."""
    try:
        aux_manifest = read_manifest(pipe.aux_dir, "aux")
    except KvpError:
        aux_manifest = {}
    stages = {"derive": aux_manifest, "fit": pipe.manifest}
    out = {name: {"wall_seconds": m.get("wall_seconds"), "calib_tokens": m.get("calib_tokens")}
           for name, m in stages.items()}
    out["eval"] = {"wall_seconds": eval_timing["wall_seconds"], "calib_tokens": None}
    return out
