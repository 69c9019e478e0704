"""The one place for architecture quirks.

KV Prediction touches the attention internals of a decoder: where keys and values
come from (k_proj / v_proj, and a key norm on qk-norm models), how RoPE rotates
keys, and how the cache is laid out. Everything model-family specific lives here;
the rest of the package talks to `ArchSpec`.

Supported: the Llama and Qwen2 families through transformers (GQA, tied embeddings,
RoPE scaling), and Qwen3 (per-head key norm). Anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KvpError, UnsupportedArchitecture

# model_type -> has a per-head RMSNorm on keys (applied before RoPE)
SUPPORTED: dict[str, bool] = {"llama": False, "qwen2": False, "qwen3": True}


def check_supported(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        archs = ",".join(getattr(config, "architectures", None) or []) or "?"
        raise UnsupportedArchitecture(
            f"unsupported architecture '{mt}' ({archs}); supported: {', '.join(sorted(SUPPORTED))}"
        )
    return mt


@dataclass(frozen=True)
class ArchSpec:
    """Shapes and quirks of one decoder, read from its config."""

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    has_key_norm: bool
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
            has_key_norm=SUPPORTED[mt],
            vocab=cfg.vocab_size,
        )


# --- module access (HF *ForCausalLM layout shared by the supported families) ---



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


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def attention(layer) -> nn.Module:
    return layer.self_attn


def key_norm(layer) -> nn.Module | None:
    return getattr(attention(layer), "k_norm", None)


def key_output(layer) -> nn.Module:
    """The module whose output is the layer's pre-RoPE key in the predictor's space: the key
    norm on qk-norm models (it reads k_proj's output), else k_proj itself."""
    return key_norm(layer) or attention(layer).k_proj


def rotary(model) -> nn.Module:
    return model.model.rotary_emb


# --- RoPE ---


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(model, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, D] for `position_ids` [B, S], with the model's own RoPE (scaling included)."""
    dummy = torch.empty(0, dtype=dtype, device=position_ids.device)
    cos, sin = rotary(model)(dummy, position_ids)
    return cos, sin


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [B, H, S, D] (pre-RoPE) to the positions of cos/sin [B, S, D]."""
    return k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)


# --- keys and values per layer, in the predictor's space ---


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]"""
    b, s, hd = x.shape
    return x.view(b, s, n_heads, hd // n_heads).transpose(1, 2)


def normalize_keys(layer, k_merged: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Apply the layer's key norm (qk-norm models) to merged pre-RoPE keys [B, S, H*D]."""
    norm = key_norm(layer)
    if norm is None:
        return k_merged
    b, s, hd = k_merged.shape
    return norm(k_merged.view(b, s, n_kv_heads, hd // n_kv_heads)).reshape(b, s, hd)


# --- running a decoder layer by layer (healing, importance, capture) ---


def positions(batch: int, seq: int, device=None) -> torch.Tensor:
    return torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(input_ids)


def run_layer(layer: nn.Module, h: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decoder layer over full, unpadded sequences (causal through SDPA's is_causal)."""
    pos = positions(h.shape[0], h.shape[1], h.device)
    out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out


def layer_io(model, input_ids: torch.Tensor):
    """Yield (i, h_in, h_out) for each decoder layer on unpadded sequences [B, S]."""
    h = embed(model, input_ids)
    pe = rotary(model)(h, positions(h.shape[0], h.shape[1], h.device))
    for i, layer in enumerate(decoder_layers(model)):
        out = run_layer(layer, h, pe)
        yield i, h, out
        h = out
