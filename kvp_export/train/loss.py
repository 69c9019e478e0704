"""The paper's training objective: the frozen base reads predicted KV; aux and predictor learn.

KVP forward (Horton et al., 2024): the aux reads the sequence, the predictor maps its
per-layer inputs to the base's keys (pre-RoPE, after the key norm) and values, and the base
runs over the same sequence with every layer's K/V replaced by the predicted ones, so its
queries attend only to predicted KV (the exact sink prefix excepted, as at inference,
runtime/kvp.py). Forward hooks do the replacement on the module that emits the pre-RoPE key
(k_proj, or the key norm on qk-norm models: the adapter's key_output) and on v_proj; the base then
applies RoPE and causal attention itself, so training runs the attention code inference runs.

Loss = CE(base with predicted KV) + CE(aux) + lambda_C * sum over layers of the mean L1
between predicted and true K and V (sink positions excluded), optionally + a z-loss on the
aux's logits (the only trained LM head) and + KL(base with its true KV || base with
predicted KV). The baseline (the paper's OE-LP) is CE(aux) alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import arch
from ..predictor.features import capture
from ..predictor.module import KVPredictor
from .plan import TrainPlan

TERMS = ("loss", "ce_base", "ce_aux", "l1", "z", "kl")


class PredictedKV:
    """While `kv` is set, every base layer reads it (per layer (K, V) [B, S, kv_dim]) instead of
    its own K/V. The hooks stay registered for the whole run: activation checkpointing
    recomputes the base's layers during backward, and they must read the same KV then."""

    def __init__(self, base):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles = []
        ad = arch.adapter(base)
        for i, layer in enumerate(ad.layers(base)):
            self._handles.append(ad.key_output(layer).register_forward_hook(self._hook(i, 0, ad.as_key_output)))
            self._handles.append(ad.value_output(layer).register_forward_hook(
                self._hook(i, 1, lambda v, like: v.reshape(like.shape))))

    def _hook(self, i: int, which: int, layout):
        def hook(_mod, _inp, out):
            if self.kv is None:
                return None
            return layout(self.kv[i][which], out).to(out.dtype)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class Trainee(nn.Module):
    """What is trained, as one module (DDP/FSDP wrap it, checkpoints save it): the aux, and
    the predictor unless training the baseline. Returns the aux's logits and the predicted
    (pre-RoPE K, V) per base layer."""

    def __init__(self, aux, predictor: KVPredictor | None):
        super().__init__()
        self.aux, self.predictor = aux, predictor

    def forward(self, ids: torch.Tensor):
        if self.predictor is None:
            return self.aux(input_ids=ids, use_cache=False).logits, None
        hidden = self.predictor.input_mode == "hidden"
        with capture(self.aux, hidden=hidden, kv=not hidden, detach=False) as got:
            logits = self.aux(input_ids=ids, use_cache=False).logits
        xk, xv = (got.hidden, got.hidden) if hidden else (got.keys, got.values)
        return logits, self.predictor(xk, xv)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def consistency_l1(pred: list, true: list, sink_len: int) -> torch.Tensor:
    """Sum over base layers of mean |pred - true| for K plus V, past the sink."""
    pairs = [(p, t) for (pk, pv), (tk, tv) in zip(pred, true) for p, t in ((pk, tk), (pv, tv))]
    return sum((p[:, sink_len:].float() - t[:, sink_len:].float()).abs().mean() for p, t in pairs)


class Objective:
    """One micro-batch's forward and backward; returns its loss terms (detached, unscaled)."""

    def __init__(self, model: nn.Module, base, plan: TrainPlan,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.model, self.base, self.r, self.autocast = model, base, plan, autocast
        self.inject = PredictedKV(base) if plan.mode == "kvp" else None

    def close(self) -> None:
        if self.inject is not None:
            self.inject.remove()

    @torch.no_grad()
    def _targets(self, ids: torch.Tensor):
        """The base's true KV per layer (pre-RoPE, after the key norm) and, for the KL term, its logits."""
        with capture(self.base, hidden=False, kv=True) as got:
            if self.r.kl:
                logits = self.base(input_ids=ids, use_cache=False).logits
            else:
                arch.adapter(self.base).decoder(self.base)(input_ids=ids, use_cache=False)
                logits = None
        return list(zip(got.keys, got.values)), logits

    def _terms(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch ("loss" is their sum); the caller resets the injection."""
        r = self.r
        terms: dict[str, torch.Tensor] = {}
        with self.autocast():
            if r.mode == "kvp":
                true, true_logits = self._targets(ids)
            aux_logits, pred = self.model(ids)
            terms["ce_aux"] = next_token_ce(aux_logits, ids)
            if r.z_loss:
                terms["z"] = r.z_loss * torch.logsumexp(aux_logits.float(), -1).pow(2).mean()
            if r.mode == "kvp":
                s = r.sink_len
                self.inject.kv = [(torch.cat([tk[:, :s], pk[:, s:]], 1), torch.cat([tv[:, :s], pv[:, s:]], 1))
                                  for (pk, pv), (tk, tv) in zip(pred, true)]
                logits = self.base(input_ids=ids, use_cache=False).logits
                terms["ce_base"] = next_token_ce(logits, ids)
                terms["l1"] = r.lambda_c * consistency_l1(pred, true, s)
                if r.kl:
                    terms["kl"] = r.kl * F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1),
                                                  F.log_softmax(true_logits.float(), -1).flatten(0, 1),
                                                  log_target=True, reduction="batchmean")
            terms["loss"] = sum(terms.values())
        return terms

    def step(self, ids: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        """Forward, then backward of loss * scale (scale = 1 / micro-steps per optimizer step)."""
        try:
            terms = self._terms(ids)
            (terms["loss"] * scale).backward()  # inside the try: recomputed base layers still read the predicted KV
        finally:
            if self.inject is not None:
                self.inject.kv = None
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of a held-out batch, without gradients (the caller sets eval mode)."""
        try:
            return self._terms(ids)
        finally:
            if self.inject is not None:
                self.inject.kv = None
