"""Gemma 3 (`gemma3_text`, e.g. Gemma 3 270M / 1B): what differs from Llama (transformers 4.57).

- Layers are sliding-window (window `sliding_window`, RoPE base `rope_local_base_freq`) or
  global (`rope_theta`), per `layer_types` (5 sliding then 1 global in the released models).
- q_norm / k_norm per head before RoPE: the predictor's keys are k_norm's output (as Qwen3).
- RMSNorm multiplies by (1 + w), in float32.
- Four norms per layer ("sandwich"): input_layernorm before attention, post_attention_layernorm
  on the attention branch's output, pre_feedforward_layernorm before the MLP and
  post_feedforward_layernorm on its output. The MLP is GELU-tanh gated.
- Embeddings are scaled by sqrt(hidden) inside the embedding module; the tied LM head is not.
- Attention scale query_pre_attn_scalar ** -0.5 (transformers' `scaling`, read by the default).
Refused: logit soft-capping (Gemma 2 checkpoints) and bidirectional attention (EmbeddingGemma).

Layer selection: every global layer is kept in a layer-pruned aux (`required_layers`), so the aux
keeps long-range attention past the window; the regular pattern, block influence or the loss
ranking (`--select loss`) picks the sliding layers that fill the rest of the keep ratio. On the
270M the loss ranking is the one that keeps a usable aux (layers 1-4 build the residual stream's
massive activations), and bridge healing lowers each layer's residual error but raises the aux's
NLL (BENCHMARKS.md, "Gemma 3 270M", session 5). The post-MLP norm sets the MLP branch's size, so
the bridge refits its factor too (`set_norm_weight`).
"""

from __future__ import annotations

import torch

from .base import Adapter


class Gemma3(Adapter):
    model_type = "gemma3_text"
    gguf_arch = "gemma3"
    qk_norm = True
    # 270M's residual stream passes float16's 65504 by layer 8 (BENCHMARKS.md, "Gemma 3 270M", Core ML)
    fp16_residual_scale = 1 / 32

    @classmethod
    def check(cls, config) -> None:
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, field, None) is not None:
                cls.refuse(f"{field} is set (logit soft-capping is not implemented)")
        if getattr(config, "use_bidirectional_attention", False):
            cls.refuse("use_bidirectional_attention (an embedding model, not a causal LM)")

    def attn_post_norm(self, layer):
        return layer.post_attention_layernorm

    def mlp_norm(self, layer):
        return layer.pre_feedforward_layernorm

    def mlp_post_norm(self, layer):
        return layer.post_feedforward_layernorm

    def norm_weight(self, norm) -> torch.Tensor:
        return 1.0 + norm.weight

    def set_norm_weight(self, norm, factor: torch.Tensor) -> None:
        norm.weight.copy_((factor - 1.0).to(norm.weight.dtype))

    def down_target(self, layer, branch: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """post_feedforward_layernorm(d) = branch holds for d along branch / (1 + w), at any scale
        (RMSNorm is scale-invariant): keep the scale down_proj's output has now."""
        u = branch / self.norm_weight(layer.post_feedforward_layernorm).clamp(min=1e-3)
        rms = lambda x: x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)  # noqa: E731
        return (u * (rms(current) / rms(u))).to(current.dtype)

    def embed_scale(self) -> float:
        return float(self.config.hidden_size) ** 0.5

    def rope_kind(self, i: int) -> str:
        return "local" if self.layer_types()[i] == "sliding_attention" else "global"

    def rotaries(self, model):
        dec = self.decoder(model)
        return {"global": dec.rotary_emb, "local": dec.rotary_emb_local}

    def required_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types()) if t == "full_attention"]

    def as_key_output(self, k, like):
        """k_norm runs on keys already transposed to [B, H, S, D]."""
        b, s, _ = k.shape
        return k.view(b, s, like.shape[1], like.shape[-1]).transpose(1, 2)
