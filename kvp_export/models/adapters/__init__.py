"""The family adapters, one module per family, found by scanning this package: adding a family
is adding one file here (and its tiny test model, tests/tiny_models.py)."""

from __future__ import annotations

import importlib
import pkgutil

from ...errors import UnsupportedArchitecture
from .base import Adapter


def _discover() -> dict[str, type[Adapter]]:
    found: dict[str, type[Adapter]] = {}
    for mod in pkgutil.iter_modules(__path__):
        if mod.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Adapter) and obj.model_type and obj.__module__ == module.__name__:
                found[obj.model_type] = obj
    return dict(sorted(found.items()))


ADAPTERS: dict[str, type[Adapter]] = _discover()


def family(model_type, gguf: bool = False) -> type[Adapter]:
    """The adapter class for a model_type (or, with `gguf`, a GGUF general.architecture)."""
    for cls in ADAPTERS.values():
        if model_type == (cls.gguf_arch or cls.model_type if gguf else cls.model_type):
            return cls
    raise UnsupportedArchitecture(f"unsupported architecture '{model_type}'; supported: {', '.join(ADAPTERS)}")


__all__ = ["ADAPTERS", "Adapter", "family"]
