"""Qwen3: Llama's layout plus a per-head RMSNorm on queries and keys before RoPE (the
predictor's keys are the key norm's output)."""

from .base import Adapter


class Qwen3(Adapter):
    model_type = "qwen3"

    def query_norm(self, layer):
        return self.attention(layer).q_norm

    def key_norm(self, layer):
        return self.attention(layer).k_norm
