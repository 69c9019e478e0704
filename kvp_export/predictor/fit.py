"""fit: the KV predictor for an auxiliary folder, in closed form (ridge.py), as a folder.

The folder holds `predictor.safetensors` and a manifest naming the aux and base it was
fitted on; generation and evaluation load both from there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import atomic_dir, check_output_dir, read_manifest, write_manifest
from ..distributed import session
from ..errors import KvpError
from ..limits import check_limits
from ..models import check_same_tokenizer, load, resolve
from ..models.source import say
from ..stage import CALIB_TOKENS, Clock, calibration, check_paths, check_positive, model_ref, ref_spec, seed_all
from .module import INPUT_MODES
from .ridge import fit_ridge


SOURCES = ("two-sided", "paper", "window")


def check_recipe(input_mode: str, sink_len: int, sources: str = "two-sided") -> None:
    if sources not in SOURCES:
        raise KvpError(f"unknown predictor sources '{sources}' (choose from {', '.join(SOURCES)})")
    if input_mode not in INPUT_MODES:
        raise KvpError(f"unknown predictor input '{input_mode}' (choose from {', '.join(INPUT_MODES)})")
    if sink_len < 0:
        raise KvpError(f"sink length must be >= 0, got {sink_len}")
    check_limits(sink_len=sink_len)


def fit(aux: str | Path, out: str | Path, *, base: str | None = None, input_mode: str = "hidden",
        sink_len: int = 1, sources: str = "two-sided", calib: list[str] | None = None, calib_tokens: int = CALIB_TOKENS,
        overwrite: bool = False, seed: int = 0, progress: bool = True) -> Path:
    """Fit a predictor from `aux` (a derive folder) to its base; write folder `out` and return it.

    The base defaults to the one the aux manifest records. `sources` "two-sided" lets a base
    layer that a layer-pruned aux skipped read the aux layers on both sides of its depth
    (hidden input only; measured here: NLL 2.97 -> 2.90 at 30k calibration tokens);
    "paper" reads one aux layer per base layer, as in Horton et al.; "window" lets every base
    layer read its aux layer and the ones before and after it. Under `torchrun` the
    processes share the calibration sequences and reduce the statistics; rank 0 writes.
    """
    clock = Clock()
    out = check_output_dir(out, overwrite)
    check_recipe(input_mode, sink_len, sources)
    check_positive(calib_tokens=calib_tokens)
    check_paths(calib, "calibration")
    aux_manifest = read_manifest(aux, "aux")
    recorded_base = aux_manifest["inputs"]["base"]
    base = base or ref_spec(recorded_base)
    seed_all(seed)
    with clock.step("load"):
        base_dir = resolve(base)
        base_model, tok = load(base_dir)
        aux_model, aux_tok = load(aux)
    check_same_tokenizer(tok, aux_tok)
    base_ref = model_ref(base, base_dir)
    if base_ref["config_sha256"] != recorded_base["config_sha256"]:
        say(f"warning: base {base} is not the model {aux} was derived from (config differs)")
    with clock.step("calibration"):
        seqs, calib_desc = calibration(tok, base_model, calib, calib_tokens)
    with clock.step("ridge"), session(torch.device("cpu")) as world:
        predictor, report = fit_ridge(base_model, aux_model, seqs, aux_manifest["layer_map"]["map"],
                                      input_mode=input_mode, sink_len=sink_len, progress=progress and world.main,
                                      kept=aux_manifest.get("kept_layers") if sources == "two-sided" else None,
                                      window=1 if sources == "window" else 0)
    if not world.main:  # under torchrun every process fits the same solution; one writes it
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        predictor.save(tmp)
        write_manifest(
            tmp, "predictor",
            inputs={"aux": model_ref(aux, Path(aux)), "base": base_ref, "calibration": calib_desc},
            recipe={"method": "ridge", "input_mode": input_mode, "sources": sources, "sink_len": sink_len,
                    "seed": seed},
            layer_map=aux_manifest["layer_map"], input_mode=input_mode, sink_len=sink_len,
            fit_report=report, calib_tokens=int(seqs.numel()), **clock.record(),
        )
    return out
