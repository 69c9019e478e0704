"""Greedy generation through onnxruntime-genai from an export's variant folder (the base decoder).

The export writes `<variant>/genai_config.json` (kvp_export/export/genai.py) so that
`onnxruntime_genai.Model(<export>/<variant>)` runs `base_decode.onnx` as a plain decoder. This
module is the validator's way to check that: token ids in, token ids out, one generator per
prompt (genai 0.18 feeds a batch's pad tokens as real tokens, with an all-ones attention mask,
so rows of different lengths are not comparable to a left-padded batch).

onnxruntime-genai is optional (`pip install kvp-export[genai]` / `kvp-validate[genai]`); its
telemetry is on by default, so ORT_DISABLE_TELEMETRY=1 is set before it is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import KvpError

GENAI_CONFIG = "genai_config.json"


def import_genai():
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise KvpError("onnxruntime-genai is not installed (pip install 'onnxruntime-genai==0.18.0')") from None
    return og


def genai_folder(export: str | Path, variant: str = "fp32") -> Path:
    """The variant folder of `export`, checked to be an onnxruntime-genai model folder."""
    folder = Path(export) / variant
    cfg = folder / GENAI_CONFIG
    if not cfg.is_file():
        raise KvpError(f"no {GENAI_CONFIG} in {folder} (an export made before genai support? re-export it)")
    import json

    try:
        name = json.loads(cfg.read_text())["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError) as e:
        raise KvpError(f"unreadable {cfg}: {e}") from None
    if not (folder / name).is_file():
        raise KvpError(f"{cfg} names a missing graph: {folder / name}")
    return folder


class GenaiBase:
    """The base model of one variant folder under onnxruntime-genai (loaded once)."""

    def __init__(self, export: str | Path, variant: str = "fp32"):
        self.og = import_genai()
        self.folder = genai_folder(export, variant)
        try:
            self.model = self.og.Model(str(self.folder))
        except Exception as e:  # genai raises a plain RuntimeError with its own message
            raise KvpError(f"onnxruntime-genai cannot load {self.folder}: {str(e).splitlines()[0]}") from None

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (ids), at most max_new_tokens, ending at EOS (excluded)."""
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray([list(prompt_ids)], dtype=np.int32))
        out: list[int] = []
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        eos = self.eos_ids()
        return next((out[:i] for i, t in enumerate(out) if t in eos), out)

    def eos_ids(self) -> set[int]:
        import json

        eos = json.loads((self.folder / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
        return set(eos) if isinstance(eos, list) else {eos}
