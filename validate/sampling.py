"""A generate call's sampling parameters and their checks, shared by the ONNX runtime (runtime.py),
the PyTorch runtime (kvp_export.runtime.decode) and `kvp generate`'s options. numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import KvpError, check_at_least
from .limits import check_limits

MAX_NEW_TOKENS = 64  # a generate call's default, both runtimes and `kvp generate`


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; else temperature, then top-k, then top-p (nucleus), seeded.
    Each field's help is `kvp generate`'s option of the same name."""

    temperature: float = field(default=0.0, metadata={"help": "0 is greedy."})
    top_k: int = field(default=0, metadata={"help": "0 is off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens "
                                                       "reaching this probability."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler."})

    def check(self) -> None:
        if self.temperature < 0:
            raise KvpError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise KvpError(f"top-k must be >= 0 (0 is off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KvpError(f"top-p must be in (0, 1], got {self.top_p}")

    def check_call(self, max_new_tokens: int, warm_repeats: int = 0) -> None:
        """A generate call's arguments with these parameters, checked before any work: the same
        rules for both runtimes (ONNX here, PyTorch in kvp_export.runtime) and `kvp generate`."""
        check_at_least(1, max_new_tokens=max_new_tokens)
        check_at_least(0, warm_repeats=warm_repeats)
        check_limits(max_new_tokens=max_new_tokens, warm_repeats=warm_repeats)
        self.check()

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            drop = np.cumsum(sorted_p, -1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            np.put_along_axis(mask, order, drop, -1)
            p = np.where(mask, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])
