"""Qwen3: Llama's layout plus a per-head RMSNorm on queries and keys before RoPE (the
predictor's keys are the key norm's output)."""

from .base import Adapter


class Qwen3(Adapter):
    model_type = "qwen3"
    qk_norm = True
