"""The training loop: distributed wrapping, AdamW with warmup + cosine, accumulation, clipping,
autocast, periodic checkpoints and resume, and held-out evaluation that keeps the best weights
(and stops early after `patience` evaluations without a new best).

Every process runs this loop on its share of each step's batch (batches.py). DDP averages
gradients across processes; FSDP (fully_shard per aux layer and on the whole) shards the
trainee's parameters, gradients and optimizer state. The frozen base is replicated: it only
needs forward and backward through its activations. Checkpoints hold the full (gathered)
state, so a run resumes on the same number of processes with either strategy.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm.auto import tqdm

from ..distributed import World
from ..log import get_logger
from ..models import arch
from .batches import Batches
from .checkpoint import Checkpoints
from .loss import TERMS, Objective, Trainee
from .plan import TrainPlan

log = get_logger()

GRAD_CKPT = {"use_reentrant": False}  # non-reentrant: gradients reach tensors the hooks inject


@dataclass
class Outcome:
    finished: bool
    step: int  # optimizer steps done
    history: list[dict]  # per step: step, lr scale, loss terms, grad norm, tokens
    train_seconds: float  # over all calls of a resumed run
    weights: dict[str, torch.Tensor] | None  # the full trainee state (rank 0, when finished): the best
    # held-out step's when evaluating, else the last step's
    evals: list[dict] = field(default_factory=list)  # per held-out evaluation: step, loss terms, best
    stopped_early: bool = False
    stop_reason: str | None = None  # "patience" or "time" (finish deadline) when stopped early


class Heldout:
    """Held-out evaluation every `plan.eval_every` steps and after the last: the loss terms on
    the same held-out sequences each time, the best weights by `plan.metric`, and patience."""

    def __init__(self, seqs, plan: TrainPlan):
        self.seqs, self.r = seqs, plan
        self.evals: list[dict] = []
        self.best: dict[str, torch.Tensor] | None = None
        self.bad = 0  # evaluations since the last new best

    def due(self, done: int) -> bool:
        return done % self.r.eval_every == 0 or done == self.r.steps

    @property
    def best_eval(self) -> dict | None:
        return min(self.evals, key=lambda e: (e[self.r.metric], e["step"])) if self.evals else None

    def evaluate(self, model, objective: Objective, trainee: Trainee, done: int, device: torch.device,
                 world: World) -> dict:
        """Evaluate now (every process, the same sequences); keep the weights if they are the best.
        The losses are averaged over processes, so all of them take the same decision."""
        model.eval()
        sums = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        seen: set[str] = set()
        try:
            for s in range(0, len(self.seqs), self.r.batch):
                ids = self.seqs[s:s + self.r.batch]
                terms = objective.evaluate(ids.to(device))
                seen |= set(terms)
                sums += torch.stack([terms.get(k, torch.zeros((), device=device)).double() for k in TERMS]) * len(ids)
        finally:
            model.train()
        means = world.mean(sums / len(self.seqs)).tolist()
        record = {"step": done, **{k: v for k, v in zip(TERMS, means) if k in seen}}
        previous = self.best_eval
        record["best"] = previous is None or record[self.r.metric] < previous[self.r.metric]
        self.evals.append(record)
        if record["best"]:
            self.bad = 0
            self.best = _model_weights(trainee)  # a collective under FSDP: every process decides alike
        else:
            self.bad += 1
        return record

    def exhausted(self) -> bool:
        return bool(self.r.patience) and self.bad >= self.r.patience


def _model_weights(trainee: Trainee) -> dict[str, torch.Tensor]:
    """A gathered copy of the trainee's weights (on the CPU; training goes on with its own)."""
    state = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items()}


def freeze(base, plan: TrainPlan) -> None:
    """No gradients for the base's weights; gradients still flow through its activations.

    transformers checkpoints layers only in train mode; a frozen base must behave as in
    inference there, so its attention dropout (if any) is zeroed."""
    base.requires_grad_(False)
    if plan.activation_checkpointing and plan.mode == "kvp":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRAD_CKPT)
        base.train()
        for layer in arch.decoder_layers(base):
            arch.adapter(base).attention(layer).attention_dropout = 0.0


def wrap(trainee: Trainee, plan: TrainPlan, world: World, device: torch.device):
    """The module the loop calls: the trainee itself, under DDP, or sharded with FSDP."""
    if plan.activation_checkpointing:
        trainee.aux.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRAD_CKPT)
    trainee.train()
    if not world.distributed:
        return trainee
    if plan.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for layer in arch.decoder_layers(trainee.aux):
        fully_shard(layer)
    fully_shard(trainee)
    return trainee


def optimizer(trainee: Trainee, plan: TrainPlan) -> torch.optim.Optimizer:
    """AdamW; group 0 is the aux, group 1 the predictor (its own learning rate)."""
    groups = [{"params": list(trainee.aux.parameters()), "lr": plan.lr}]
    if trainee.predictor is not None:
        groups.append({"params": list(trainee.predictor.parameters()), "lr": plan.predictor_lr})
    return torch.optim.AdamW(groups, weight_decay=plan.weight_decay)


def _sync(model, world: World, plan: TrainPlan, last: bool):
    """Gradient synchronisation only on the last micro-step of an optimizer step."""
    if not world.distributed or last:
        if world.distributed and plan.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if plan.strategy == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _full_state(trainee: Trainee, opt: torch.optim.Optimizer):
    """Gathered model and optimizer state (a collective under FSDP; every process calls it)."""
    return get_state_dict(trainee, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _describe(terms: dict, tok_s: float) -> str:
    shown = " ".join(f"{k} {v:.4g}" for k, v in terms.items() if k in TERMS)
    return f"{shown} | {tok_s:,.0f} tok/s"


def run(trainee: Trainee, base, plan: TrainPlan, batches: Batches, world: World, device: torch.device,
        ckpts: Checkpoints, *, checkpoint_every: int, heldout=None, stop_after: int | None = None,
        deadline: float | None = None, finish: float | None = None, progress: bool = True) -> Outcome:
    """Train from the latest checkpoint in `ckpts` (or from the start) to the end of the plan
    (or to an early stop on the held-out loss), or until `stop_after` steps in this call or the
    time.perf_counter() `deadline` (then checkpoint and stop). At the perf_counter() `finish`
    the run ends as if its last step were done: a held-out evaluation (if due to evaluate at
    all), and the outcome is finished (a time budget). `heldout`: the held-out sequences, when
    plan.eval_every is set."""
    t0 = time.perf_counter()
    freeze(base, plan)
    model = wrap(trainee, plan, world, device)
    opt = optimizer(trainee, plan)
    start, history, seconds_before = 0, [], 0.0
    held = Heldout(heldout, plan) if plan.eval_every else None
    latest = ckpts.latest()
    if latest is not None:
        weights, state = ckpts.load(latest)
        set_state_dict(trainee, opt, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        start, history, seconds_before = state["step"], state["history"], state["train_seconds"]
        if held is not None:
            held.evals, held.bad, held.best = state["evals"], state["bad_evals"], state.get("best_weights")
        _restore_rng(state["rng"])
        if world.main:
            log.info(f"resuming from {latest} (step {start} of {plan.steps})")
    def autocast():
        if plan.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    objective = Objective(model, base, plan, autocast)
    lrs = [plan.lr, plan.predictor_lr]
    log_every = max(1, plan.steps // 20)
    bar = tqdm(total=plan.steps, initial=start, unit="step", desc=f"train {plan.mode}",
               disable=not (progress and world.main))
    try:
        for step in range(start, plan.steps):
            t_step = time.perf_counter()
            scale = plan.lr_scale(step)
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * scale
            record = {"step": step + 1, "lr_scale": scale,
                      **_optimizer_step(model, objective, opt, batches.micro_batches(step), plan, world, device)}
            history.append(record)
            tok_s = plan.tokens_per_step / (time.perf_counter() - t_step)
            bar.update(1)
            bar.set_postfix_str(_describe(record, tok_s), refresh=False)
            if world.main and bar.disable and (step + 1) % log_every == 0:  # no bar: a line now and then
                log.info(f"train step {step + 1}/{plan.steps}: {_describe(record, tok_s)}")
            finishing = (finish is not None and step + 1 < plan.steps
                         and world.any(time.perf_counter() >= finish, device))
            evaluated = held is not None and (held.due(step + 1) or finishing)
            if evaluated:
                e = held.evaluate(model, objective, trainee, step + 1, device, world)
                if world.main:
                    line = (f"held-out {plan.metric} {e[plan.metric]:.4g} at step {step + 1}"
                            f"{' (best)' if e['best'] else f' (best {held.best_eval[plan.metric]:.4g})'}")
                    if bar.disable:
                        log.info(line)
                    else:
                        bar.write(line, file=sys.stderr)
            why = None
            if evaluated and held.exhausted() and not finishing:
                why = ("patience", f"early stop after step {step + 1}: no better held-out {plan.metric} in "
                                   f"{plan.patience} evaluations")
            elif finishing:
                why = ("time", f"finished after step {step + 1} of {plan.steps}: the time budget (finish_after) "
                               "is spent")
            if why is not None:  # a finished run, before its last step: the best (or last) weights
                if world.main:
                    log.info(why[1])
                return Outcome(True, step + 1, history, seconds_before + time.perf_counter() - t0,
                               _final_weights(trainee, opt, held, world), held.evals if held else [],
                               stopped_early=True, stop_reason=why[0])
            if step + 1 == plan.steps:
                break
            out_of_time = deadline is not None and world.any(time.perf_counter() >= deadline, device)
            stop = out_of_time or (stop_after is not None and step + 1 - start >= stop_after)
            if stop or (step + 1) % checkpoint_every == 0:
                _save(ckpts, trainee, opt, world, step + 1, history, seconds_before + time.perf_counter() - t0, held)
            if stop:
                if world.main:
                    log.info(f"stopped after step {step + 1} of {plan.steps}; checkpoint in {ckpts.folder} "
                        "(run again with --resume to continue)")
                return Outcome(False, step + 1, history, seconds_before + time.perf_counter() - t0, None,
                               held.evals if held else [])
    finally:
        bar.close()
        objective.close()
    weights = _final_weights(trainee, opt, held, world)
    return Outcome(True, plan.steps, history, seconds_before + time.perf_counter() - t0, weights,
                   held.evals if held else [])


def _final_weights(trainee: Trainee, opt, held: Heldout | None, world: World) -> dict | None:
    """What the run returns (rank 0): the best held-out weights when evaluating, else the last."""
    weights, _ = _full_state(trainee, opt)  # a collective under FSDP: every process calls it
    if held is not None and held.best is not None:
        weights = held.best
    return weights if world.main else None


def _optimizer_step(model, objective: Objective, opt, micro: list[torch.Tensor], plan: TrainPlan, world: World,
                    device: torch.device) -> dict:
    """Accumulate the micro-batches' gradients, clip, step; the loss terms averaged over all
    micro-batches of all processes, and the gradient norm before clipping."""
    sums = torch.zeros(len(TERMS), device=device)
    for i, ids in enumerate(micro):
        with _sync(model, world, plan, last=i == len(micro) - 1):
            terms = objective.step(ids.to(device), 1 / len(micro))
        sums += torch.stack([terms.get(k, torch.zeros((), device=device)).float() for k in TERMS])
    params = [p for g in opt.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, plan.clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    means = world.mean(sums / len(micro)).tolist()
    return {"grad_norm": float(grad_norm), **{k: v for k, v in zip(TERMS, means) if k in terms}}


def _save(ckpts: Checkpoints, trainee: Trainee, opt, world: World, step: int, history: list, seconds: float,
          held: Heldout | None) -> None:
    weights, optim = _full_state(trainee, opt)
    if world.main:
        state = {"optimizer": optim, "step": step, "history": history, "train_seconds": seconds, "rng": _rng_state()}
        if held is not None:
            state |= {"evals": held.evals, "bad_evals": held.bad}
        ckpts.save(step, weights, state, best=held.best if held else None)
    world.barrier()
