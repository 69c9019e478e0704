"""Shapes, RoPE and layer-by-layer runs of a decoder, over its family's adapter.

Every family quirk lives in one adapter per family (models/adapters/, dispatched by the
config's `model_type`); this module gives the rest of the package the shapes (`ArchSpec`),
the adapter of a model (`adapter`), and the operations built on the adapter that several
stages share: per-layer RoPE, sliding-window masks, running a decoder layer by layer.
Supported: Llama, Qwen2, Qwen3 and Gemma 3 (text) through transformers; anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KvpError
from .adapters import Adapter, family


def check_supported(config) -> str:
    """The config's model_type, or one line naming it and the supported families."""
    mt = getattr(config, "model_type", None)
    family(mt)
    return mt


def check_gguf_supported(architecture) -> None:
    """Refuse a GGUF by its general.architecture before its config is built."""
    family(architecture, gguf=True)


def adapter(model_or_config) -> Adapter:
    cfg = getattr(model_or_config, "config", model_or_config)
    return family(check_supported(cfg))(cfg)


@dataclass(frozen=True)
class ArchSpec:
    """Shapes of one decoder, read from its config."""

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def of(cls, model_or_config) -> ArchSpec:
        cfg = getattr(model_or_config, "config", model_or_config)
        mt = check_supported(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            model_type=mt,
            n_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
        )


def parameters(config) -> int:
    """The parameters a decoder of this config holds (embeddings, attention and MLP; norms left out)."""
    h, layers, vocab, ffn = (int(getattr(config, k)) for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                                              "intermediate_size"))
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or h // max(heads, 1))
    attn = h * heads * hd * 2 + 2 * h * kv * hd
    embed = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embed + layers * (attn + 3 * h * ffn)


def check_sizes(config, weight_bytes: int, what: str) -> None:
    """Refuse a config whose sizes its weights cannot hold, before a model of that size is built: a
    header claiming 10^9 layers or a 2^20-wide embedding over a few kB of weights would otherwise
    allocate (or loop) until the machine gives out. Allows 2-bit weights (GGUF Q2_K is ~2.6) and 1 MiB."""
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")
    for k in keys:
        v = getattr(config, k, None)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise KvpError(f"cannot load model from {what}: its config's {k} is {v!r} (a positive integer expected)")
    n = parameters(config)
    if n / 4 > weight_bytes + (1 << 20):
        raise KvpError(f"cannot load model from {what}: its config describes {n:.3g} parameters "
                       f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary "
                       f"{config.vocab_size}), its weights hold {weight_bytes} bytes")


def context_length(model_or_config) -> int | None:
    return adapter(model_or_config).context_length()


def decoder_layers(model) -> nn.ModuleList:
    return adapter(model).layers(model)


# --- RoPE ---


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_by_kind(model, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin [B, S, D] for `position_ids` [B, S] per rotary kind, with the model's own RoPE (scaling included)."""
    dummy = torch.empty(0, dtype=dtype, device=position_ids.device)
    return {kind: rot(dummy, position_ids) for kind, rot in adapter(model).rotaries(model).items()}


def layer_rope(model, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin [B, S, D] per decoder layer: each layer with its own rotary embedding."""
    ad = adapter(model)
    by_kind = rope_by_kind(model, position_ids, dtype)
    return [by_kind[ad.rope_kind(i)] for i in range(ArchSpec.of(model).n_layers)]


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [B, H, S, D] (pre-RoPE) to the positions of cos/sin [B, S, D]."""
    return k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)


# --- keys and values per layer, in the predictor's space ---


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]"""
    b, s, hd = x.shape
    return x.view(b, s, n_heads, hd // n_heads).transpose(1, 2)


def normalize_keys(ad: Adapter, layer, k_merged: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Apply the layer's key norm (qk-norm families) to merged pre-RoPE keys [B, S, H*D]."""
    norm = ad.key_norm(layer)
    if norm is None:
        return k_merged
    b, s, hd = k_merged.shape
    return norm(k_merged.view(b, s, n_kv_heads, hd // n_kv_heads)).reshape(b, s, hd)


# --- running a decoder layer by layer (healing, importance, capture) ---


def positions(batch: int, seq: int, device=None) -> torch.Tensor:
    return torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)


def window_mask(window: int | None, seq: int, dtype: torch.dtype, device=None) -> torch.Tensor | None:
    """None (plain causal) or the additive [1, 1, S, S] mask of a sliding window: query q sees
    keys k with q - window < k <= q, as transformers masks sliding layers."""
    if window is None or seq <= window:
        return None
    q = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None]
    visible = (k <= q) & (k > q - window)
    return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


class LayerRunner:
    """Runs the layers of one model over full, unpadded sequences, each with its own RoPE and mask."""

    def __init__(self, model):
        self.model, self.ad = model, adapter(model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ad.embedding(self.model)(input_ids)

    def context(self, h: torch.Tensor):
        """What every layer of a pass over h [B, S, hidden] shares: RoPE by kind, masks by window."""
        pos = positions(h.shape[0], h.shape[1], h.device)
        pe = {kind: rot(h, pos) for kind, rot in self.ad.rotaries(self.model).items()}
        return pe, {}

    def mask(self, ctx, i: int, h: torch.Tensor):
        w = self.ad.window(i)
        masks = ctx[1]
        if w not in masks:
            masks[w] = window_mask(w, h.shape[1], h.dtype, h.device)
        return masks[w]

    def run(self, i: int, layer, h: torch.Tensor, ctx=None) -> torch.Tensor:
        """Layer `layer` at index i of this model over h (ctx from `context`, or built here)."""
        ctx = ctx or self.context(h)
        return self.ad.run_layer(layer, h, ctx[0][self.ad.rope_kind(i)], self.mask(ctx, i, h))

    def mlp_parts(self, i: int, layer, h: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, m): the post-attention residual and the MLP's inner activations (Adapter.mlp_parts)."""
        ctx = ctx or self.context(h)
        return self.ad.mlp_parts(layer, h, ctx[0][self.ad.rope_kind(i)], self.mask(ctx, i, h))

    def mlp_out(self, layer, d: torch.Tensor) -> torch.Tensor:
        return self.ad.mlp_out(layer, d)


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    return adapter(model).embedding(model)(input_ids)


def layer_io(model, input_ids: torch.Tensor):
    """Yield (i, h_in, h_out) for each decoder layer on unpadded sequences [B, S]."""
    run = LayerRunner(model)
    h = run.embed(input_ids)
    ctx = run.context(h)
    for i, layer in enumerate(decoder_layers(model)):
        out = run.run(i, layer, h, ctx)
        yield i, h, out
        h = out
