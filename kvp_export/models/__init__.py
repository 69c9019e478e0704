"""Model sources: the zoo, GGUF conversion, resolving and loading (see zoo.py, source.py)."""

from .source import check_same_tokenizer, convert_gguf, load, load_tokenizer, resolve
from .zoo import DEFAULT_MODEL, ZOO, ZooEntry, list_models, pull

__all__ = [
    "DEFAULT_MODEL",
    "ZOO",
    "ZooEntry",
    "check_same_tokenizer",
    "convert_gguf",
    "list_models",
    "load",
    "load_tokenizer",
    "pull",
    "resolve",
]
