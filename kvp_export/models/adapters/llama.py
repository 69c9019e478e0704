"""Llama (and SmolLM2): the default adapter as it is (GQA, tied embeddings, RoPE scaling)."""

from .base import Adapter


class Llama(Adapter):
    model_type = "llama"
