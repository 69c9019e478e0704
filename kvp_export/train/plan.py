"""A training run's plan (`TrainPlan`): every choice that decides its trajectory, resolved from
the TrainConfig and the inputs (steps from a token budget, warmup, the world size) and checked
before any work. (A *recipe* is `kvp run`'s YAML file; a manifest's `recipe` records the options
that made a folder.)

The plan is recorded in the output manifest and in every checkpoint (under the key `recipe`,
which older checkpoints hold too, so they still resume); a resumed run must
have the same one, or it would not reach the same result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import TrainConfig, check_mix
from ..errors import KvpError
from ..limits import check_limits

MODES = ("kvp", "baseline")
WARMUP_SHARE = 0.05  # of the steps, when not given


@dataclass(frozen=True)
class TrainPlan:
    mode: str  # "kvp": aux + predictor through the base (the paper); "baseline": aux alone, plain CE
    steps: int
    batch: int  # sequences per process per micro-step
    accum: int  # micro-steps per optimizer step
    seq_len: int
    world_size: int
    lr: float  # aux
    predictor_lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float  # the cosine ends at lr * min_lr_ratio
    clip: float  # max gradient norm; 0 is off
    lambda_c: float  # weight of the summed per-layer L1 consistency loss
    z_loss: float
    kl: float
    sink_len: int
    precision: str  # "fp32" or "bf16" (autocast; weights stay fp32)
    activation_checkpointing: bool
    strategy: str
    data: tuple[str, ...]
    mix: str
    seed: int
    eval_every: int = 0  # optimizer steps between held-out evaluations (and after the last); 0 is off
    eval_tokens: int = 0  # held-out tokens per evaluation
    patience: int = 0  # stop after this many evaluations without a new best; 0 is off

    @property
    def metric(self) -> str:
        """The held-out loss that picks the best checkpoint: the base's CE reading predicted KV
        (what KVP serves), or for the baseline the aux's own CE."""
        return "ce_aux" if self.mode == "baseline" else "ce_base"

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.batch * self.accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def lr_scale(self, step: int) -> float:
        """Linear warmup to 1, then cosine to min_lr_ratio; `step` counts from 0.

        A pure function of the step, so a resumed run needs no scheduler state."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    def differences(self, recorded: dict) -> list[str]:
        """Fields where a recorded plan differs from this one."""
        mine = self.to_dict()
        return [f"{k} {recorded.get(k)!r} != {v!r}" for k, v in mine.items() if recorded.get(k) != v]


def check_call(cfg: TrainConfig, *, baseline: bool, data: list[str] | None, stop_after: int | None,
               max_minutes: float | None, finish_after: float | None = None) -> None:
    """What the config alone cannot check: the config against this call's inputs and limits
    (before anything is loaded)."""
    check_mix(data, cfg.mix)
    check_limits(stop_after=stop_after, max_minutes=max_minutes, finish_after=finish_after)
    if stop_after is not None and stop_after < 1:
        raise KvpError(f"stop-after must be >= 1, got {stop_after}")
    for name, v in (("max-minutes", max_minutes), ("finish-after", finish_after)):
        if v is not None and not v > 0:
            raise KvpError(f"{name} must be > 0, got {v}")
    if baseline and cfg.kvp_only():
        flag = cfg.kvp_only()[0].replace("_", "-")
        raise KvpError(f"--{flag} applies to KVP training; --baseline trains the aux alone with plain CE")


def steps_for(tokens: int | None, steps: int | None, tokens_per_step: int) -> int:
    """Steps from a token budget (rounded up to whole steps)."""
    return steps if steps is not None else max(1, math.ceil(tokens / tokens_per_step))


def warmup_for(warmup_steps: int | None, steps: int) -> int:
    if warmup_steps is None:
        return max(1, round(WARMUP_SHARE * steps))
    if warmup_steps >= steps:
        raise KvpError(f"warmup-steps ({warmup_steps}) must be fewer than the steps ({steps})")
    return warmup_steps


def eval_every_for(eval_every: int | None, steps: int) -> int:
    """Held-out evaluations: every `eval_every` steps, by default about ten over the run."""
    return max(1, steps // 10) if eval_every is None else eval_every
