"""train: end-to-end training of the aux and the predictor through the frozen base (Horton et
al., 2024), or of the aux alone with plain CE (the paper's OE-LP baseline, same budget).

It starts from a fit folder: its healed aux and ridge predictor. It writes, atomically,
- KVP: a predictor folder (predictor.safetensors, manifest naming the trained aux and the
  base) holding the trained aux in `aux/` (an aux folder with its manifest), so `kvp eval`
  and `kvp generate` take it as they take a fit folder;
- baseline: an aux folder, which `kvp fit` and `kvp eval --aux` take like a derive folder.
The same call runs under `torchrun` (DDP or FSDP). Checkpoints in `OUT.ckpt/` (by default)
let a killed run resume to the result an uninterrupted run reaches.

Generalisation is measured, not assumed: every `eval_every` steps (about ten times a run by
default) the loss is computed on held-out sequences (the held-out split of the same data:
for `pypi-code`, projects never trained on), written to `train_log.jsonl`, and the output
holds the weights of the best held-out step; `patience` stops a run that stopped improving.
The manifest records the best step and its loss, the unique tokens of the training stream
and the epochs made over it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import atomic_dir, check_output_dir, read_manifest, sha256_file, write_manifest
from ..config import SEED, TOKENS, TrainConfig, configure
from ..distributed import resolve_device, session
from ..errors import KvpError
from ..models import check_same_tokenizer, load
from ..models.arch import ArchSpec, context_length
from ..predictor.module import WEIGHTS, KVPredictor
from ..stage import Clock, calibration, check_paths, load_model, model_ref, ref_spec, seed_all, sequences
from .batches import Batches
from .checkpoint import Checkpoints, steps_in
from .loop import Outcome, run
from .loss import Trainee
from .plan import TrainPlan, check_call, eval_every_for, steps_for, warmup_for

LOG = "train_log.jsonl"


@dataclass
class StartFolders:
    """What a run starts from: the fit folder (KVP), the aux folder, and the base's spec."""

    predictor: Path | None
    predictor_manifest: dict | None
    aux: Path
    aux_manifest: dict
    base: str


def start_folders(predictor: str | Path | None, aux: str | Path | None, base: str | None, baseline: bool) -> StartFolders:
    if predictor is None and not baseline:
        raise KvpError("KVP training starts from a fitted predictor: pass --predictor (or --baseline to "
                       "fine-tune the aux alone)")
    if predictor is None and aux is None:
        raise KvpError("--baseline needs an aux folder (--aux) or a predictor folder naming one (--predictor)")
    pm = read_manifest(predictor, "predictor") if predictor is not None else None
    aux_dir = Path(aux or pm["inputs"]["aux"]["path"])
    am = read_manifest(aux_dir, "aux")
    recorded = pm["inputs"]["base"] if pm else am["inputs"]["base"]
    return StartFolders(None if baseline else Path(predictor), None if baseline else pm, aux_dir, am,
                   base or ref_spec(recorded))


def train(out: str | Path, config: TrainConfig | None = None, *, predictor: str | Path | None = None,
          aux: str | Path | None = None, base: str | None = None, baseline: bool = False,
          data: list[str] | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
          stop_after: int | None = None, max_minutes: float | None = None, finish_after: float | None = None,
          overwrite: bool = False, seed: int = SEED,
          progress: bool = True, **options) -> Path | None:
    """Train and write folder `out`; return it, or None when stopped early (stop_after /
    max_minutes) with a checkpoint to resume from.

    `config` (or `options`, its fields by name, e.g. steps=100) holds the training choices
    (config.TrainConfig: budget, optimizer, losses, evaluation); the keywords here say what to
    start from and how this call runs. `data` is the training text (default: the calibration
    split of the built-in corpus). `resume` continues from the latest checkpoint if there is
    one; `max_minutes` counts from the call's start (loading included), for machines that limit
    a command's time. `finish_after` (minutes, from the same start) is a time budget instead: the
    run ends there as if its last step were done and writes `out` (with the best held-out
    weights); the manifest says `stopped: "time"`.
    """
    clock = Clock()
    out = check_output_dir(out, overwrite)
    (cfg,) = configure(options, (TrainConfig, config))
    check_call(cfg, baseline=baseline, data=data, stop_after=stop_after, max_minutes=max_minutes,
               finish_after=finish_after)
    check_paths(data, "training data")
    tokens = TOKENS if cfg.steps is None and cfg.tokens is None else cfg.tokens
    batch, accum, seq_len, eval_tokens = cfg.batch, cfg.accum, cfg.seq_len, cfg.eval_tokens
    src = start_folders(predictor, aux, base, baseline)
    dev = resolve_device(cfg.device)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".ckpt")
    if steps_in(ckpt_dir) and not resume:
        raise KvpError(f"checkpoints of an earlier run are in {ckpt_dir}: pass --resume to continue it, or delete "
                       "that folder to start over")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")

    with session(dev) as world:
        seed_all(seed)
        with clock.step("load"):
            base_ref, base_model, aux_model, pred, tok = _models(src, bf16)
        sb = ArchSpec.of(base_model)
        sink_len = 0 if baseline else src.predictor_manifest["sink_len"]
        seq_len = min(seq_len, *(c for c in (context_length(base_model), context_length(aux_model)) if c))
        if seq_len < sink_len + 2:
            raise KvpError(f"seq-len must be >= {sink_len + 2} (sink {sink_len} + two predicted tokens)")

        tokens_per_step = batch * accum * world.size * seq_len
        n_steps = steps_for(tokens, cfg.steps, tokens_per_step)
        every = eval_every_for(cfg.eval_every, n_steps)
        if every and eval_tokens < seq_len:
            raise KvpError(f"eval-tokens ({eval_tokens}) is less than one sequence of {seq_len} tokens")
        plan = TrainPlan(
            mode="baseline" if baseline else "kvp", steps=n_steps, batch=batch, accum=accum, seq_len=seq_len,
            world_size=world.size, lr=cfg.lr, predictor_lr=cfg.predictor_lr or cfg.lr,
            weight_decay=cfg.weight_decay, warmup_steps=warmup_for(cfg.warmup_steps, n_steps),
            min_lr_ratio=cfg.min_lr_ratio, clip=cfg.clip,
            lambda_c=0.0 if baseline else (1 / sb.n_layers if cfg.lambda_c is None else cfg.lambda_c),
            z_loss=cfg.z_loss, kl=cfg.kl or 0.0, sink_len=sink_len, precision="bf16" if bf16 else "fp32",
            activation_checkpointing=cfg.activation_checkpointing, strategy=cfg.strategy, data=tuple(data or ()),
            mix=cfg.mix, seed=seed, eval_every=every, eval_tokens=eval_tokens if every else 0,
            patience=cfg.patience or 0)
        with clock.step("data"):
            seqs, data_desc = calibration(tok, base_model, data, n_steps * tokens_per_step, seq_len=seq_len,
                                          mix=cfg.mix, stream=True)
            heldout, heldout_desc = (sequences(tok, base_model, data, eval_tokens, split="heldout", seq_len=seq_len,
                                               mix=cfg.mix) if every else (None, None))
        refs = {"base": base_ref, "aux": model_ref(src.aux, src.aux)}
        if pred is not None:
            refs["predictor"] = {"path": str(src.predictor.resolve()),
                                 "weights_sha256": sha256_file(src.predictor / WEIGHTS)}
        identity = {**{k: r["weights_sha256"] for k, r in refs.items()}, "data": data_desc["tokens_sha256"]}
        if heldout_desc is not None:
            identity["heldout"] = heldout_desc["tokens_sha256"]
        ckpts = Checkpoints(ckpt_dir, plan, identity)
        if world.main:
            ckpts.clean_partial()
        world.barrier()

        trainee = Trainee(aux_model, pred).to(dev)
        base_model.to(dev)
        batches = Batches(seqs, plan, world.rank)
        with clock.step("train"):
            outcome = run(trainee, base_model, plan, batches, world, dev, ckpts,
                          checkpoint_every=cfg.checkpoint_every,
                          heldout=heldout, stop_after=stop_after, progress=progress,
                          deadline=clock.start + 60 * max_minutes if max_minutes else None,
                          finish=clock.start + 60 * finish_after if finish_after else None)
        if not outcome.finished:
            return None
        if world.main:
            training = {"tokens": outcome.step * tokens_per_step, "steps": outcome.step,
                        "unique_tokens": int(seqs.numel()), "epochs": batches.epochs(outcome.step),
                        "train_seconds": round(outcome.train_seconds, 3), "device": _device_name(dev),
                        "world_size": world.size, "strategy": cfg.strategy if world.distributed else None,
                        "planned_steps": n_steps, "stopped": outcome.stop_reason,
                        "loss": summarize(outcome.history), "heldout": heldout_summary(outcome, plan, heldout_desc)}
            if heldout_desc is not None:
                data_desc = {**data_desc, "heldout": heldout_desc}
            _write(out, overwrite, src, plan, outcome, refs, data_desc, training, tok, clock)
            ckpts.remove()
        world.barrier()
    return out


def _models(src: StartFolders, bf16: bool):
    """(base's model_ref, base, aux, predictor or None, tokenizer), refused unless they fit together."""
    base, tok, base_ref = load_model(src.base, dtype=torch.bfloat16 if bf16 else torch.float32)  # frozen: no fp32 master needed
    aux, aux_tok = load(src.aux)
    pred = KVPredictor.load(src.predictor) if src.predictor else None
    check_same_tokenizer(tok, aux_tok)
    sb, sa = ArchSpec.of(base), ArchSpec.of(aux)
    if sa.vocab != sb.vocab:
        raise KvpError(f"the aux's vocabulary ({sa.vocab}) differs from the base's ({sb.vocab})")
    if pred is not None:
        from ..runtime.pipeline import check_compatible  # transformers' generation code: only when needed

        check_compatible(base, aux, pred)
    return base_ref, base, aux, pred, tok


def _device_name(dev: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu"


def summarize(history: list[dict]) -> dict:
    """Per loss term: first, last, min, and the mean of the last tenth of the steps."""
    keys = [k for k in history[-1] if k not in ("step", "lr_scale")]
    tail = history[-max(1, len(history) // 10):]
    return {k: {"first": history[0][k], "last": history[-1][k], "min": min(h[k] for h in history),
                "mean_last_tenth": sum(h[k] for h in tail) / len(tail)} for k in keys}


def heldout_summary(outcome: Outcome, plan: TrainPlan, desc: dict | None) -> dict | None:
    """The held-out evaluations in brief: which step's weights the output holds, and why."""
    if not outcome.evals:
        return None
    best = min(outcome.evals, key=lambda e: (e[plan.metric], e["step"]))
    return {"metric": plan.metric, "every": plan.eval_every, "tokens": desc["tokens"],
            "sequences": desc["sequences"], "evaluations": len(outcome.evals), "best_step": best["step"],
            "best_loss": best[plan.metric], "last_step": outcome.evals[-1]["step"],
            "last_loss": outcome.evals[-1][plan.metric], "patience": plan.patience or None,
            "stopped_early": outcome.stopped_early, "weights": f"step {best['step']} (best held-out {plan.metric})"}


def log_lines(history: list[dict], evals: list[dict]) -> str:
    """train_log.jsonl: one line per step; an evaluation's terms ride on its step as heldout_*."""
    by_step = {e["step"]: e for e in evals}
    return "".join(json.dumps({**h, **{f"heldout_{k}": v for k, v in by_step.get(h["step"], {}).items()
                                       if k != "step"}}) + "\n" for h in history)


def _write(out: Path, overwrite: bool, src: StartFolders, plan: TrainPlan, outcome: Outcome, refs: dict, data_desc: dict,
           training: dict, tok, clock: Clock) -> None:
    """The output folder (rank 0): the trained aux as an HF folder, and the trained predictor."""
    weights = outcome.weights
    aux_model, _ = load(src.aux)  # a plain copy: under FSDP the trained one is sharded
    aux_model.load_state_dict({k.removeprefix("aux."): v for k, v in weights.items() if k.startswith("aux.")})
    am = src.aux_manifest
    lineage = {k: am[k] for k in ("family", "kept_layers", "layer_map", "base_layers", "aux_layers") if k in am}
    method = "baseline-ce" if plan.mode == "baseline" else "kvp-train"
    common = {"calib_tokens": training["tokens"], "training": training}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        aux_dir, final_aux = (tmp, out) if plan.mode == "baseline" else (tmp / "aux", out / "aux")
        aux_model.save_pretrained(aux_dir, safe_serialization=True)
        tok.save_pretrained(aux_dir)
        (tmp / LOG).write_text(log_lines(outcome.history, outcome.evals))
        write_manifest(aux_dir, "aux", inputs={"base": refs["base"], "aux": refs["aux"], "data": data_desc},
                       recipe={"method": method, **plan.to_dict()}, **lineage, **common, **clock.record())
        if plan.mode == "kvp":
            pred = KVPredictor.load(src.predictor)
            pred.load_state_dict({k.removeprefix("predictor."): v for k, v in weights.items()
                                  if k.startswith("predictor.")})
            pred.save(tmp)
            aux_ref = {**model_ref(final_aux, aux_dir), "path": str(final_aux.resolve())}
            pm = src.predictor_manifest
            write_manifest(tmp, "predictor",
                           inputs={"aux": aux_ref, "base": refs["base"], "predictor": refs["predictor"],
                                   "aux_init": refs["aux"], "data": data_desc},
                           recipe={"method": method, **plan.to_dict(), "sources": pm["recipe"].get("sources")},
                           layer_map=pm["layer_map"], input_mode=pm["input_mode"], sink_len=pm["sink_len"],
                           **common, **clock.record())
