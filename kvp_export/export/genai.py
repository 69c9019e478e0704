"""genai_config.json: each ONNX variant folder as an onnxruntime-genai model folder.

onnxruntime-genai (`og.Model(folder)`) reads `genai_config.json`, the ONNX decoder it names and
the Hugging Face tokenizer files beside it (tokenizer.json, tokenizer_config.json; the export
already copies them into every variant folder). Our `base_decode.onnx` is a plain decoder with
genai's default I/O names (input_ids, attention_mask over past+new tokens, position_ids,
past_key_values.N.key/value -> logits over the new tokens, present.N.key/value = past + new), so
genai generates with it as it is: the base model, without KVP.

Constraints of genai's config parser (0.18.0): unknown keys are an error (so no KVP metadata
here), and file names must be relative and inside the folder. Our graphs concatenate past and
new keys, so `past_present_share_buffer` must be false (genai then feeds each step's
`present.*` back as the next `past_key_values.*`).

Tokenizer: genai tokenizes with onnxruntime-extensions, which picks its BPE flavour from
tokenizer_config.json's `tokenizer_class` and tokenizer.json's decoder. A byte-level BPE (GPT-2
style) converted from GGUF by transformers is labelled `LlamaTokenizerFast` with a SentencePiece-
style decoder chain (ByteFallback, Fuse, Replace '▁', ByteLevel); extensions then encodes every
space as '▁' bytes missing from the vocabulary (ids -1). For such tokenizers the export writes a
corrected copy to `<variant>/genai_tokenizer/` (decoder ByteLevel, class GPT2TokenizerFast; the
same ids and text for every input as the original, checked by tests) and points genai at it with
`model.tokenizer_dir`, leaving the folder's own tokenizer files, which optimum reads, unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .to_onnx import decoder_io

GENAI_CONFIG = "genai_config.json"
DECODER_GRAPH = "base_decode.onnx"
# model.type values genai 0.18 maps to its plain decoder-only model; anything else is "decoder"
GENAI_TOKENIZER = "genai_tokenizer"
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
GENAI_TYPES = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "smollm3"}


def genai_config(*, model_type: str, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int,
                 vocab: int, context: int, bos_token_id: int | None, eos_token_ids: list[int],
                 pad_token_id: int | None, max_length: int | None = None) -> dict:
    """The genai config for `base_decode.onnx` of a base with these shapes (a plain dict)."""
    io = decoder_io(n_layers, with_past=True)
    assert io.inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and io.outputs[0] == "logits"
    assert io.inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    eos = sorted(set(eos_token_ids))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    context = int(context) if context and context > 0 else 2048
    return {
        "model": {
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "bos_token_id": bos_token_id if bos_token_id is not None else pad,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "vocab_size": int(vocab),
            "context_length": context,
            "decoder": {
                "filename": DECODER_GRAPH,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": int(head_dim),
                "hidden_size": int(hidden),
                "num_attention_heads": int(n_heads),
                "num_hidden_layers": int(n_layers),
                "num_key_value_heads": int(n_kv_heads),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "max_length": min(int(max_length or context), context), "min_length": 0, "do_sample": False,
            "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
            "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "past_present_share_buffer": False,
        },
    }


def _types(node: dict | None) -> list[str]:
    if not node:
        return []
    return [node.get("type", "")] + [t for sub in node.get("decoders", node.get("pretokenizers", []))
                                     for t in _types(sub)]


def needs_genai_tokenizer(tokenizer: dict, tokenizer_config: dict) -> bool:
    """A byte-level BPE labelled and decoded as a SentencePiece one (what GGUF conversion writes),
    whose vocabulary has no '▁' or <0xNN> tokens (so a plain ByteLevel decoder decodes the same)."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in _types(tokenizer.get("pre_tokenizer")):
        return False
    decoders = _types(tokenizer.get("decoder"))
    if decoders == ["ByteLevel"] and "Llama" not in str(tokenizer_config.get("tokenizer_class", "")):
        return False
    byte_token = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    return not any("\u2581" in t or byte_token.match(t) for t in model.get("vocab", {}))


def write_genai_tokenizer(variant_dir: Path) -> str | None:
    """`variant_dir/genai_tokenizer/` when genai's tokenizer needs the corrected copy; its name or None."""
    variant_dir = Path(variant_dir)
    tj, tc = variant_dir / "tokenizer.json", variant_dir / "tokenizer_config.json"
    if not (tj.is_file() and tc.is_file()):
        return None
    tokenizer, tokenizer_config = json.loads(tj.read_text()), json.loads(tc.read_text())
    if not needs_genai_tokenizer(tokenizer, tokenizer_config):
        return None
    out = variant_dir / GENAI_TOKENIZER
    out.mkdir(exist_ok=True)
    tokenizer["decoder"] = BYTE_LEVEL_DECODER
    tokenizer_config["tokenizer_class"] = "GPT2TokenizerFast"
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if (variant_dir / "special_tokens_map.json").is_file():
        shutil.copy2(variant_dir / "special_tokens_map.json", out / "special_tokens_map.json")
    return GENAI_TOKENIZER


def write_genai_config(variant_dir: Path, spec, *, context: int, bos_token_id: int | None,
                       eos_token_ids: list[int], pad_token_id: int | None) -> Path:
    """Write `variant_dir/genai_config.json` for the base decoder of `spec` (an ArchSpec), after the
    tokenizer files were copied there (and genai_tokenizer/ when needed)."""
    cfg = genai_config(model_type=spec.model_type, n_layers=spec.n_layers, n_heads=spec.n_heads,
                       n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, hidden=spec.hidden, vocab=spec.vocab,
                       context=context, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids,
                       pad_token_id=pad_token_id)
    tokenizer_dir = write_genai_tokenizer(variant_dir)
    if tokenizer_dir:
        cfg["model"]["tokenizer_dir"] = tokenizer_dir
    path = Path(variant_dir) / GENAI_CONFIG
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path
