"""Qwen2 (and Qwen2.5): Llama's layout with q/k/v biases; sliding-window layers, when the config
enables them, are read from `layer_types` by the default adapter."""

from .base import Adapter


class Qwen2(Adapter):
    model_type = "qwen2"

    def prune_config(self, config, layers: list[int]) -> None:
        super().prune_config(config, layers)
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, len(layers))
