"""Model sources: zoo names, GGUF files and Hugging Face folders, all resolved to a folder.

Every later stage loads a plain float Hugging Face folder written by the pinned
transformers: folders from other versions load wrongly (docs/architecture.md, "Stack facts
that shaped the code"). A GGUF is converted once, checked against the GGUF-loaded model's
logits, and cached.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..artifacts import read_manifest, sha256_file
from ..cache import cache_dir
from ..errors import KvpError
from . import zoo
from .arch import check_sizes, check_supported
from .gguf import convert_gguf, gguf_metadata, is_converted
from .tokenizer import _FOLDER_TOKENIZER_KW, _first_line, check_same_tokenizer

__all__ = ["check_same_tokenizer", "convert_gguf", "load", "load_tokenizer", "resolve"]

def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.startswith((".", "~")) or spec.lower().endswith(".gguf")


def _resolve_gguf(path: Path) -> Path:
    """Convert a user's GGUF once, cached by content hash."""
    gguf_metadata(path)  # refuse garbage before hashing it
    sha = sha256_file(path)
    folder = cache_dir("models") / f"gguf-{sha[:16]}"
    if is_converted(folder, sha):
        return _checked(folder)
    return convert_gguf(path, folder, overwrite=True)


def _checked(folder: Path) -> Path:
    """A cached model folder, its files checked against its manifest (a changed weight file is
    refused in one line naming it: `kvp models pull --force` or deleting the folder rebuilds it)."""
    read_manifest(folder, "model")
    return folder


def resolve(spec: str | Path) -> Path:
    """A Hugging Face folder for a zoo name, a GGUF file or an existing folder."""
    text = str(spec)
    if text in zoo.ZOO:
        return _checked(zoo.pull(text))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvpError(f"not a model folder (no config.json): {path}")
        return path.resolve()
    if path.is_file():
        return _resolve_gguf(path.resolve())
    if path.exists() or _looks_like_path(text):
        raise KvpError(f"no such file or folder: {path}")
    raise KvpError(f"unknown model '{text}': not a file or folder, nor a zoo name ({', '.join(zoo.ZOO)})")


def _folder_config(folder: Path):
    """The folder's config, refused by architecture before any weight is read."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(str(folder))
    except (OSError, ValueError) as e:
        raise KvpError(f"unreadable config.json in {folder}: {_first_line(e)}") from None
    check_supported(SimpleNamespace(model_type=raw.get("model_type"), architectures=raw.get("architectures")))
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise KvpError(f"unreadable config.json in {folder}: {_first_line(e)}") from None
    weights = [p.stat().st_size for p in folder.glob("*.safetensors")]
    if weights:  # none: the loader refuses the folder (safetensors only)
        check_sizes(config, sum(weights), str(folder))
    return config


def load(spec: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model in eval mode, tokenizer) for any model spec `resolve` accepts."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(spec)
    config = _folder_config(folder)
    try:
        # safetensors only: weights never go through pickle
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
        )
        tok = AutoTokenizer.from_pretrained(folder, **_FOLDER_TOKENIZER_KW)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise KvpError(f"cannot load model from {folder}: {_first_line(e)}") from None
    if len(tok) > config.vocab_size:  # its ids would index past the embedding
        raise KvpError(f"cannot load model from {folder}: its tokenizer has {len(tok)} tokens, the model's "
                       f"vocabulary {config.vocab_size} (a tokenizer from another model?)")
    return model.eval(), tok


def load_tokenizer(spec: str | Path):
    """The tokenizer alone of any model spec `resolve` accepts (no weights are read)."""
    from transformers import AutoTokenizer

    folder = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(folder, **_FOLDER_TOKENIZER_KW)
    except (OSError, ValueError) as e:
        raise KvpError(f"cannot load the tokenizer of {folder}: {_first_line(e)}") from None
