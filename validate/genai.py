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
        decoder = json.loads(cfg.read_text())["model"]["decoder"]
        names = ([decoder["filename"]] if "pipeline" not in decoder else
                 [stage["filename"] for stages in decoder["pipeline"] for stage in stages.values()])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KvpError(f"unreadable {cfg}: {e}") from None
    for name in names:
        if not (folder / name).is_file():
            raise KvpError(f"{cfg} names a missing graph: {folder / name}")
    return folder


KVP_FOLDER = "genai-kvp"  # kvp_export.export.genai_kvp.FOLDER: the decoder-pipeline with KVP's prompt stage


def refuse_tail(art) -> None:
    """genai's KVP prompt stage is kvp_prefill + the first step over the sink and the last token:
    an export with an exact tail (`model.tail` > 0) has no genai KVP pipeline."""
    if art.manifest.model.tail:
        raise KvpError(f"onnxruntime-genai's KVP pipeline takes no exact tail (this export's tail is "
                       f"{art.manifest.model.tail}): use our runtime, or export with tail 0")


def kvp_folder(export, variant: str = "fp32") -> Path:
    """`<export>/<variant>/genai-kvp`, checked before genai reads any of it: its manifest was made
    from this export's kvp_prefill and base_decode (else it is stale), and every file it holds has
    the size and SHA-256 that manifest lists (integrity.verify). `export`: a folder or an OnnxArtifact."""
    from .artifact import MANIFEST, OnnxArtifact, load_manifest
    from .contract import parse_manifest
    from .integrity import verify

    art = export if isinstance(export, OnnxArtifact) else OnnxArtifact.open(export)
    art.check_variant(variant)
    refuse_tail(art)
    base = genai_folder(art.folder, variant)
    folder = base / KVP_FOLDER
    rebuild = f"kvp export genai-kvp {art.folder} --variant {variant}"
    if not (folder / GENAI_CONFIG).is_file():
        raise KvpError(f"no {KVP_FOLDER}/ in {base} (build it: {rebuild})")
    if not (folder / MANIFEST).is_file():
        raise KvpError(f"no {MANIFEST} in {folder} (made before genai-kvp folders listed their files; rebuild it: {rebuild})")
    raw = load_manifest(folder, KVP_FOLDER)
    inputs = parse_manifest(raw, folder, KVP_FOLDER).inputs
    graphs = art.manifest.variants[variant]
    for name in ("kvp_prefill", "base_decode"):
        if getattr(inputs, name) != graphs[name].sha256:
            raise KvpError(f"{folder} was not built from this export's {variant} {name} (a stale {KVP_FOLDER}/? "
                           f"rebuild it: {rebuild})")
    verify(folder, raw)  # every file listed, of its size and SHA-256
    for fname, sha in graphs["base_decode"].sha256.items():  # the token stage is the export's own graph
        if raw["files"].get(fname, {}).get("sha256") != sha:
            raise KvpError(f"{folder / fname} is not this export's {fname} (a stale {KVP_FOLDER}/? rebuild it: {rebuild})")
    return genai_folder(base, KVP_FOLDER)


class GenaiBase:
    """One genai model folder, loaded once: `<export>/<variant>` (the base decoder) or, with
    kvp=True, `<export>/<variant>/genai-kvp` (KVP's prompt stage, then the base decoder)."""

    def __init__(self, export: str | Path, variant: str = "fp32", *, kvp: bool = False, threads: int | None = None):
        import json
        import time

        self.og = import_genai()
        self.kvp = kvp
        self.folder = kvp_folder(export, variant) if kvp else genai_folder(export, variant)
        t0 = time.perf_counter()
        try:
            config = self.og.Config(str(self.folder))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
            self.model = self.og.Model(config)
        except Exception as e:  # genai raises a plain RuntimeError with its own message
            raise KvpError(f"onnxruntime-genai cannot load {self.folder}: {str(e).splitlines()[0]}") from None
        self.load_seconds = time.perf_counter() - t0

    def run(self, prompt_ids: Sequence[int], max_new_tokens: int, **search) -> tuple[list[int], float]:
        """(new tokens up to EOS excluded, seconds from the prompt to the first token id)."""
        import time

        import numpy as np

        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, **search, max_length=len(prompt_ids) + max_new_tokens)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([list(prompt_ids)], dtype=np.int32))
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        out = [int(gen.get_next_tokens()[0])]
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        eos = self.eos_ids()
        return next((out[:i] for i, t in enumerate(out) if t in eos), out), ttft

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (ids), at most max_new_tokens, ending at EOS (excluded)."""
        return self.run(prompt_ids, max_new_tokens)[0]

    def eos_ids(self) -> set[int]:
        import json

        eos = json.loads((self.folder / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
        return set(eos) if isinstance(eos, list) else {eos}
