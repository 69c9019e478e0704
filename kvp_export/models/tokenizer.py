"""Tokenizers: how a model folder's tokenizer is loaded, and the check that two models read
text the same way (a base and its aux must)."""

from __future__ import annotations

from ..errors import TokenizerMismatch

# transformers 4.57.3+ warns that any >100k-vocab folder it saved itself has Mistral's
# broken regex (false for ours); saying so explicitly silences it and changes nothing.
_FOLDER_TOKENIZER_KW = {"fix_mistral_regex": False}
# Code, prose and unicode: tokenizers that agree on these agree in practice.
_PROBES = (
    "def add(a, b):\n    return a + b  # sum\n\tx = [1, 22, 333]\n",
    "The quick brown fox jumps over the lazy dog. It's 3:15 pm!",
    "naïve café – 日本語 🙂 Ωμέγα\n\n  end",
)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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
