"""Layer pruning: which base layers the auxiliary model keeps, and building it."""

from __future__ import annotations

import copy
from fractions import Fraction

import torch
from torch import nn

from ..config import keep_problem, layers_problem
from ..errors import KvpError
from ..models import arch


def regular_layers(n_layers: int, keep_ratio: float, required: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The paper's regular pattern: keep 0.25 keeps 0,4,8,...; 0.5 keeps 0,2,4,...; 0.75 drops 3,7,11,...

    Layer i is dropped when the running count of drops, floor(i * (1 - keep_ratio)), steps up at i.
    `required` layers (the family adapter's `required_layers`) are always kept, within the same
    count: the pattern then spreads the remaining slots over the other layers.
    """
    if (why := keep_problem(keep_ratio)) is not None:
        raise KvpError(why)
    drop = 1 - Fraction(keep_ratio).limit_denominator(1000)
    kept = [i for i in range(n_layers) if (drop * (i + 1)).__floor__() == (drop * i).__floor__()]
    must = sorted(set(required))
    if not must or set(must) <= set(kept):
        return kept
    others = [i for i in range(n_layers) if i not in must]
    n_rest = max(len(kept) - len(must), 0)
    rest = regular_layers(len(others), Fraction(n_rest, len(others))) if n_rest and others else []
    return sorted(must + [others[j] for j in rest])


def check_layers(layers: list[int], n_layers: int) -> list[int]:
    """The kept layers, sorted; refused (config.layers_problem) against the base's `n_layers`."""
    if (why := layers_problem(layers, n_layers)) is not None:
        raise KvpError(why)
    return sorted(layers)


@torch.no_grad()
def importance_layers(model, seqs: torch.Tensor, n_keep: int, batch: int = 4) -> tuple[list[int], list[float]]:
    """Keep the n_keep layers that change the residual stream most (ShortGPT's block influence).

    Influence of layer i = 1 - cos(h_in, h_out), averaged over non-sink tokens of the
    calibration sequences. Layer 0 is always kept: it builds the attention sink; so are the
    family adapter's `required_layers`.
    """
    n = arch.ArchSpec.of(model).n_layers
    must = [0, *(i for i in arch.adapter(model).required_layers() if i != 0)]
    if not 0 < n_keep <= n:
        raise KvpError(f"cannot keep {n_keep} of {n} layers")
    score = torch.zeros(n, dtype=torch.float64)
    for s in range(0, len(seqs), batch):
        for i, h_in, h_out in arch.layer_io(model, seqs[s : s + batch]):
            cos = torch.nn.functional.cosine_similarity(h_in[:, 1:].double(), h_out[:, 1:].double(), dim=-1)
            score[i] += (1 - cos).sum()
    score /= seqs.shape[0] * (seqs.shape[1] - 1)
    return _top(score, must, n_keep), score.tolist()


@torch.no_grad()
def loss_layers(model, seqs: torch.Tensor, n_keep: int, max_tokens: int = 4096) -> tuple[list[int], list[float]]:
    """Keep the n_keep layers whose removal alone raises the calibration loss most (Shortened
    LLaMA's perplexity criterion, one shot): next-token NLL of the base without layer i, on at
    most `max_tokens` of the calibration sequences (one LM head pass per layer).

    Block influence misranks Gemma 3 270M's layers (BENCHMARKS.md, "Gemma 3 270M"): layers that
    barely turn the residual stream can still carry what the LM head reads. Layer 0 and the
    family adapter's `required_layers` are always kept.
    """
    run = arch.LayerRunner(model)
    layers = run.ad.layers(model)
    n = len(layers)
    must = [0, *(i for i in run.ad.required_layers() if i != 0)]
    if not 0 < n_keep <= n:
        raise KvpError(f"cannot keep {n_keep} of {n} layers")
    head, norm = run.ad.lm_head(model), run.ad.final_norm(model)
    score = torch.zeros(n, dtype=torch.float64)
    seqs = seqs[: max(1, max_tokens // seqs.shape[1])]
    for ids in seqs.split(1):  # one sequence at a time: a large vocabulary's logits are the memory
        h = run.embed(ids)
        ctx = run.context(h)
        inputs = []  # the base's input to each layer: removing layer i changes nothing before it
        for i, layer in enumerate(layers):
            inputs.append(h)
            h = run.run(i, layer, h, ctx)
        for i in range(n):
            h = inputs[i]
            for j in range(i + 1, n):
                h = run.run(j, layers[j], h, ctx)
            logits = head(norm(h[:, :-1])).float()
            score[i] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    score /= seqs.shape[0] * (seqs.shape[1] - 1)
    return _top(score, must, n_keep), score.tolist()


def _top(score: torch.Tensor, must: list[int], n_keep: int) -> list[int]:
    """The `must` layers, then the highest scores, up to n_keep, sorted."""
    ranked = must + [i for i in torch.argsort(score, descending=True).tolist() if i not in must]
    return sorted(ranked[:n_keep])


def prune(base: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of `base` holding only `layers` (weights shared by value, not by reference)."""
    layers = check_layers(layers, arch.ArchSpec.of(base).n_layers)
    aux = copy.deepcopy(base)
    ad = arch.adapter(aux)
    kept = nn.ModuleList([ad.layers(aux)[i] for i in layers])
    for new_idx, layer in enumerate(kept):
        ad.attention(layer).layer_idx = new_idx  # the cache is indexed by position in the stack
    ad.set_layers(aux, kept)
    ad.prune_config(aux.config, layers)
    return aux
