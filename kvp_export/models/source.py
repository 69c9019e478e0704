"""Model sources: zoo names, GGUF files and Hugging Face folders, all resolved to a folder.

Every later stage loads a plain float Hugging Face folder written by the pinned
transformers: folders from other versions load wrongly (docs/architecture.md, "Stack facts
that shaped the code"). A GGUF is converted once, checked against the GGUF-loaded model's
logits, and cached.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..artifacts import atomic_dir, check_output_dir, read_manifest, sha256_file, write_manifest
from ..cache import cache_dir
from ..errors import KvpError, TokenizerMismatch
from .arch import check_supported

# Conversion must reproduce the GGUF-loaded model; both run the same float32 weights.
LOGITS_TOL = 1e-4
_CHECK_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
# transformers 4.57.3+ warns that any >100k-vocab folder it saved itself has Mistral's
# broken regex (false for ours); saying so explicitly silences it and changes nothing.
_FOLDER_TOKENIZER_KW = {"fix_mistral_regex": False}
# Code, prose and unicode: tokenizers that agree on these agree in practice.
_PROBES = (
    "def add(a, b):\n    return a + b  # sum\n\tx = [1, 22, 333]\n",
    "The quick brown fox jumps over the lazy dog. It's 3:15 pm!",
    "naïve café – 日本語 🙂 Ωμέγα\n\n  end",
)


def say(msg: str) -> None:
    """Progress for long steps, on stderr so stdout stays machine-readable."""
    print(f"kvp: {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --- GGUF ---


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file; a truncated or foreign file is refused in one line."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
        if not reader.tensors:
            raise ValueError("no tensors")
        return {k: f.contents() for k, f in reader.fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise KvpError(f"not a valid GGUF file ({_first_line(e)}): {path}") from None


def _gguf_config(gguf: Path, meta: dict[str, Any]):
    """The GGUF's transformers config, refused by architecture before any weight is read."""
    from transformers import AutoConfig

    check_supported(SimpleNamespace(model_type=meta.get("general.architecture"), architectures=None))
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_supported(config)
    check_sizes(config, gguf.stat().st_size, f"GGUF file {gguf}")
    return config


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


def _gguf_tokenizer(gguf: Path, meta: dict[str, Any]):
    """Tokenizer from the GGUF, with the special tokens the GGUF declares.

    transformers 4.57's GGUF converter sets eos to the bos token and, for Llama, always
    prepends BOS; restore what the file says (SmolLM2: eos <|im_end|>, no BOS).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.vocab_file = None  # else save_pretrained copies the whole GGUF as "tokenizer.model"
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and 0 <= tid < len(tok):
            setattr(tok, f"{kind}_token", tok.convert_ids_to_tokens(int(tid)))
    if "tokenizer.ggml.add_bos_token" in meta and hasattr(type(tok), "add_bos_token"):
        tok.add_bos_token = bool(meta["tokenizer.ggml.add_bos_token"])
    return tok


def write_converted(gguf: str | Path, folder: str | Path) -> dict[str, Any]:
    """Dequantize `gguf` into the (empty, temporary) `folder`; return the checks for the manifest."""
    from transformers import AutoModelForCausalLM

    gguf, folder = Path(gguf), Path(folder)
    meta = gguf_metadata(gguf)
    config = _gguf_config(gguf, meta)
    tok = _gguf_tokenizer(gguf, meta)
    ids = tok(_CHECK_PROMPT, return_tensors="pt").input_ids

    say(f"dequantizing {gguf.name} ({config.model_type}, {config.num_hidden_layers} layers) to float32")
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = src(ids).logits
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one with the same weights.
    cfg = copy.deepcopy(src.config)
    cfg.__dict__.pop("quantization_config", None)
    state = src.state_dict()
    del src
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    del state
    say(f"saving safetensors to {folder}")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model

    diff = _verify_folder(folder, tok, ids, ref, getattr(cfg, "rope_theta", None))
    say(f"converted; logits match the GGUF-loaded model (max abs diff {diff:.3g})")
    return {
        "gguf_name": meta.get("general.name"),
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "rope_theta": getattr(cfg, "rope_theta", None),
        "dtype": "float32",
        "logits_check": {"prompt_tokens": ids.shape[1], "max_abs_diff": diff, "tolerance": LOGITS_TOL},
    }


def _verify_folder(folder: Path, tok, ids: torch.Tensor, ref: torch.Tensor, rope_theta: float | None) -> float:
    """Reload the saved folder as later stages will; it must behave like the GGUF-loaded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_same_tokenizer(tok, AutoTokenizer.from_pretrained(folder, **_FOLDER_TOKENIZER_KW))
    if getattr(back.config, "rope_theta", None) != rope_theta:
        raise KvpError(f"conversion lost rope_theta: {getattr(back.config, 'rope_theta', None)} != {rope_theta}")
    with torch.no_grad():
        diff = (back(ids).logits - ref).abs().max().item()
    if not diff <= LOGITS_TOL:
        raise KvpError(f"converted model's logits differ from the GGUF's by {diff:.3g} (> {LOGITS_TOL})")
    return diff


def is_converted(folder: str | Path, gguf_sha256: str) -> bool:
    """Whether `folder` is a finished conversion of the GGUF with this hash."""
    try:
        manifest = read_manifest(folder, "model", check=False)  # its files are checked by resolve()
    except KvpError:
        return False
    return manifest.get("inputs", {}).get("gguf_sha256") == gguf_sha256


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a GGUF into a float32 safetensors folder with a manifest, atomically."""
    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise KvpError(f"no such file: {gguf}")
    out = check_output_dir(out_dir, overwrite)
    sha = sha256_file(gguf)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        facts = write_converted(gguf, tmp)
        write_manifest(tmp, "model", inputs={"gguf_file": gguf.name, "gguf_sha256": sha}, conversion=facts)
    return out


# --- resolving and loading ---


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
    from . import zoo

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


def check_same_tokenizer(tok_a, tok_b) -> None:
    """Refuse two tokenizers that would give a base and auxiliary model different token ids."""
    if len(tok_a) != len(tok_b):
        raise TokenizerMismatch(f"tokenizers differ: vocab size {len(tok_a)} vs {len(tok_b)}")
    for kind in ("bos", "eos"):
        a, b = getattr(tok_a, f"{kind}_token_id"), getattr(tok_b, f"{kind}_token_id")
        if a != b:
            raise TokenizerMismatch(f"tokenizers differ: {kind} token id {a} vs {b}")
    for text in _PROBES:
        a, b = tok_a(text).input_ids, tok_b(text).input_ids
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise TokenizerMismatch(
                f"tokenizers differ: encoding of {text[:24]!r}... ({len(a)} vs {len(b)} tokens, first at {at})"
            )
