"""GGUF files: converted once into a float32 Hugging Face folder (written by the pinned
transformers), checked against the GGUF-loaded model's logits, with a manifest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_dir, check_output_dir, read_manifest, sha256_file, write_manifest
from ..errors import KvpError
from ..log import get_logger
from .arch import check_gguf_supported, check_sizes, check_supported
from .tokenizer import _FOLDER_TOKENIZER_KW, _first_line, check_same_tokenizer

log = get_logger()

# Conversion must reproduce the GGUF-loaded model; both run the same float32 weights.
LOGITS_TOL = 1e-4
_CHECK_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'

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

    check_gguf_supported(meta.get("general.architecture"))
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_supported(config)
    check_sizes(config, gguf.stat().st_size, f"GGUF file {gguf}")
    return config


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

    log.info(f"dequantizing {gguf.name} ({config.model_type}, {config.num_hidden_layers} layers) to float32")
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
    log.info(f"saving safetensors to {folder}")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model

    diff = _verify_folder(folder, tok, ids, ref, getattr(cfg, "rope_theta", None))
    log.info(f"converted; logits match the GGUF-loaded model (max abs diff {diff:.3g})")
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
