"""The adapter contract, with the behaviour of a Llama-style decoder as its default.

An adapter owns everything one model family does its own way, so the rest of the package
never names a Hugging Face module or a family's config field:
- a layer's parts: its norms (before attention, after attention, before the MLP, after the
  MLP), q/k/v/o, the query and key norms, the MLP's inner function and its down projection;
- per layer: which rotary embedding rotates its queries and keys, and its attention window
  (None = causal over everything, else sliding: a query at position p sees keys at p - window + 1..p);
- the attention scale, the embedding module (and its scale), the final norm and LM head;
- how pruning rewrites the config, the context length, and the names of the exported MatMuls
  the int8 quantizer keeps in fp32.
A Llama-style layer is h + o(attn(norm1(h))), then + down(act(gate(x)) * up(x)) with x = norm2(h).
A family that differs overrides only what differs (see the other files in this package).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedArchitecture


class Adapter:
    """One family's quirks, bound to one config (a base's or an aux's: their layers differ)."""

    model_type: str = ""  # transformers' model_type, the registry key
    gguf_arch: str | None = None  # general.architecture in GGUF files, when it is not model_type
    qk_norm: bool = False  # per-head q_norm / k_norm on the attention module before RoPE
    # Core ML computes in float16: the residual stream is carried times this there (export/coreml/stateful.py)
    fp16_residual_scale: float = 1.0
    # Exported MatMuls (by name in the traced graph) whose inputs carry the attention sink's
    # massive activations: one per-tensor int8 activation scale would crush every other token
    # (export/quantize.py). The names are export/modules.py's: "qkv" (q/k/v fused with the
    # predictor), "final" (the predictor's read of the final norm), and the MLP's down projection.
    int8_keep_fp32: tuple[str, ...] = ("down_proj", "/qkv/", "/final/")

    def __init__(self, config):
        self.config = config
        self.check(config)

    @classmethod
    def check(cls, config) -> None:
        """Refuse a config of this family that the adapter cannot run exactly (one line)."""

    @classmethod
    def refuse(cls, what: str) -> None:
        raise UnsupportedArchitecture(f"unsupported {cls.model_type} variant: {what}")

    # --- the model's parts ---

    def decoder(self, model) -> nn.Module:
        """The decoder stack without the LM head (calling it returns hidden states)."""
        return model.model

    def layers(self, model) -> nn.ModuleList:
        return self.decoder(model).layers

    def set_layers(self, model, layers: nn.ModuleList) -> None:
        self.decoder(model).layers = layers

    def embedding(self, model) -> nn.Module:
        """The token embedding module; it applies the family's embedding scale itself."""
        return self.decoder(model).embed_tokens

    def embed_scale(self) -> float:
        """What the embedding module multiplies rows by (for code that gathers rows itself)."""
        return 1.0

    def final_norm(self, model) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model) -> nn.Module:
        return model.lm_head

    # --- a layer's parts ---

    def attention(self, layer) -> nn.Module:
        return layer.self_attn

    def projections(self, layer) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q_proj, k_proj, v_proj, o_proj)."""
        a = self.attention(layer)
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj

    def query_norm(self, layer) -> nn.Module | None:
        """Per-head norm on queries before RoPE (`q_norm` in families with `qk_norm`), else None."""
        return self.attention(layer).q_norm if self.qk_norm else None

    def key_norm(self, layer) -> nn.Module | None:
        """Per-head norm on keys before RoPE (`k_norm` in families with `qk_norm`), else None."""
        return self.attention(layer).k_norm if self.qk_norm else None

    def key_output(self, layer) -> nn.Module:
        """The module whose output is the layer's pre-RoPE key in the predictor's space."""
        return self.key_norm(layer) or self.projections(layer)[1]

    def as_key_output(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Merged pre-RoPE keys k [B, S, H*D] laid out as key_output's output `like` (training
        substitutes predicted keys there): [B, S, H*D] or [B, S, H, D] here."""
        return k.reshape(like.shape)

    def value_output(self, layer) -> nn.Module:
        return self.projections(layer)[2]

    def input_norm(self, layer) -> nn.Module:
        """The norm before attention: its output is what q/k/v (and the predictor's hidden mode) read."""
        return layer.input_layernorm

    def attn_post_norm(self, layer) -> nn.Module | None:
        """A norm on the attention branch's output before the residual add, else None."""
        return None

    def mlp_norm(self, layer) -> nn.Module:
        return layer.post_attention_layernorm

    def mlp_post_norm(self, layer) -> nn.Module | None:
        """A norm on the MLP branch's output before the residual add, else None."""
        return None

    def mlp(self, layer) -> nn.Module:
        return layer.mlp

    def mlp_inner(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP's activations before its down projection, from its normed input x."""
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

    def down_proj(self, mlp: nn.Module) -> nn.Linear:
        return mlp.down_proj

    def norm_weight(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel factor an RMSNorm module multiplies the normalised input by (for
        re-implemented norms, e.g. the fp16-safe one of the Core ML export)."""
        return norm.weight

    def set_norm_weight(self, norm: nn.Module, factor: torch.Tensor) -> None:
        """Store `factor` as the norm's per-channel factor (the inverse of `norm_weight`; healing)."""
        norm.weight.copy_(factor.to(norm.weight.dtype))

    def norm_eps(self, norm: nn.Module) -> float:
        return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def down_target(self, layer, branch: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The down projection's output that makes the MLP branch add `branch` to the residual
        (`current` is its output now); healing fits down_proj to it."""
        return branch

    # --- attention per layer ---

    def layer_types(self) -> list[str]:
        """Per layer, transformers' attention kind ("full_attention" or "sliding_attention")."""
        types = getattr(self.config, "layer_types", None)
        return list(types) if isinstance(types, list) else ["full_attention"] * self.config.num_hidden_layers

    def window(self, i: int) -> int | None:
        """Layer i's sliding window, or None when it attends causally to everything."""
        if self.layer_types()[i] == "sliding_attention" and getattr(self.config, "sliding_window", None):
            return int(self.config.sliding_window)
        return None

    def rope_kind(self, i: int) -> str:
        """The key in `rotaries` of the rotary embedding layer i uses."""
        return "global"

    def rotaries(self, model) -> dict[str, nn.Module]:
        """The model's rotary embeddings by kind; each maps (x, position_ids) -> (cos, sin)."""
        return {"global": self.decoder(model).rotary_emb}

    def attn_scale(self, layer) -> float:
        """The factor on q.k: transformers' own `scaling` of the layer's attention."""
        return float(self.attention(layer).scaling)

    def attention_branch(self, layer, x: torch.Tensor, pos_emb: tuple, mask) -> torch.Tensor:
        """The attention module over normed input x [B, S, hidden] (before any post norm)."""
        return self.attention(layer)(x, position_embeddings=pos_emb, attention_mask=mask)[0]

    def mlp_parts(self, layer, h: torch.Tensor, pos_emb: tuple, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, m) of layer `layer` over h [B, S, hidden]: the residual after the attention branch
        and the MLP's inner activations, so that the layer's output is a + mlp_out(down_proj(m))."""
        o = self.attention_branch(layer, self.input_norm(layer)(h), pos_emb, mask)
        post = self.attn_post_norm(layer)
        a = h + (post(o) if post is not None else o)
        return a, self.mlp_inner(self.mlp(layer), self.mlp_norm(layer)(a))

    def mlp_out(self, layer, d: torch.Tensor) -> torch.Tensor:
        """What the MLP branch adds to the residual, from down_proj's output d."""
        post = self.mlp_post_norm(layer)
        return post(d) if post is not None else d

    def run_layer(self, layer, h: torch.Tensor, pos_emb: tuple, mask) -> torch.Tensor:
        """Layer `layer` over full sequences h [B, S, hidden], composed from the parts above (so a
        family states only its parts); `pos_emb` is the layer's (cos, sin), `mask` None (causal)
        or an additive [1, 1, S, S] mask (sliding window). tests/test_families.py checks it
        against transformers' own layers."""
        a, m = self.mlp_parts(layer, h, pos_emb, mask)
        return a + self.mlp_out(layer, self.down_proj(self.mlp(layer))(m))

    # --- config ---

    def prune_config(self, config, layers: list[int]) -> None:
        """Rewrite `config` in place for a model keeping only `layers` (sorted base indices)."""
        config.num_hidden_layers = len(layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in layers]

    def context_length(self) -> int | None:
        """The longest sequence (positions) the model was built for, or None if unknown."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 0) or None

    def required_layers(self) -> list[int]:
        """Base layers every layer-pruned aux keeps (besides layer 0); the rest are chosen by the
        regular pattern or by importance."""
        return []
