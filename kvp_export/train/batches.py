"""Which sequences each process trains on at each step.

The packed sequences are read as one stream, reshuffled every epoch by a generator seeded
from (seed, epoch); step t takes the next global batch from that stream, and process r
takes its contiguous share of it. The batch of a step is thus a pure function of (seed,
step, plan): 2 processes x batch b see exactly what 1 process x batch 2b sees, and a
resumed run continues with the sequences an uninterrupted run would have read.
"""

from __future__ import annotations

import torch

from .plan import TrainPlan


class Batches:
    def __init__(self, seqs: torch.Tensor, plan: TrainPlan, rank: int):
        self.seqs, self.plan, self.rank = seqs, plan, rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) == 2:  # a step may cross an epoch boundary
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.seqs), generator=g)
        return self._perms[epoch]

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This process's micro-batches [batch, seq_len] of optimizer step `step` (from 0)."""
        r = self.plan
        share = r.batch * r.accum
        start = step * r.global_batch + self.rank * share
        idx = [int(self._perm(p // len(self.seqs))[p % len(self.seqs)]) for p in range(start, start + share)]
        return list(self.seqs[idx].split(r.batch))

    def epochs(self, steps: int) -> float:
        """Passes over the sequences that `steps` steps make."""
        return steps * self.plan.global_batch / len(self.seqs)
