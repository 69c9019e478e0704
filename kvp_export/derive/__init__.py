"""derive: the auxiliary model, written as a Hugging Face folder that from_pretrained loads.

Two families (docs/method.md, "Auxiliary models and layer maps"):
- layer-pruned (KVP-LP): the base with layers removed (the paper's regular pattern, an
  explicit list, or the most important ones), then healed so its hidden states track the
  base's (heal.py); layer map "lp";
- a smaller sibling (KVP-C): an existing model sharing the base's tokenizer; layer map "c".
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_dir, check_output_dir, write_manifest
from ..errors import KvpError
from ..models import DEFAULT_MODEL, check_same_tokenizer, load, resolve
from ..models.arch import ArchSpec
from ..predictor.layermap import c_map, lp_map
from ..stage import (CALIB_TOKENS, Clock, calibration, check_paths, check_positive, compute_device, model_ref,
                     seed_all)
from .heal import METHODS as HEAL_METHODS
from .heal import heal as heal_aux
from .prune import check_layers, importance_layers, prune, regular_layers

KEEP = 0.5
SELECTS = ("regular", "importance")


def check_recipe(keep: float | None, layers: list[int] | None, select: str, heal: str | None,
                 sibling: str | None) -> tuple[float | None, str]:
    """Refuse contradictory or out-of-range options; returns (keep, heal) with defaults filled."""
    if select not in SELECTS:
        raise KvpError(f"unknown layer selection '{select}' (choose from {', '.join(SELECTS)})")
    if sibling is not None:
        if keep is not None or layers is not None or select != "regular":
            raise KvpError("--sibling uses that model as it is: drop --keep, --layers and --select")
        if heal not in (None, "none"):
            raise KvpError("healing applies to a layer-pruned aux, not to a --sibling model")
        return None, "none"
    if layers is not None and (keep is not None or select != "regular"):
        raise KvpError("give either --layers or --keep (with --select), not both")
    if layers is None:
        keep = KEEP if keep is None else keep
        if not 0 < keep <= 1:
            raise KvpError(f"keep ratio must be in (0, 1], got {keep}")
    heal = heal or "bridge"
    if heal not in HEAL_METHODS:
        raise KvpError(f"unknown healing method '{heal}' (choose from {', '.join(HEAL_METHODS)})")
    return keep, heal


def derive(out: str | Path, *, base: str = DEFAULT_MODEL, keep: float | None = None,
           layers: list[int] | None = None, select: str = "regular", heal: str | None = None,
           sibling: str | None = None, calib: list[str] | None = None, calib_tokens: int = CALIB_TOKENS,
           distill_epochs: int = 2, distill_lr: float = 1e-4, overwrite: bool = False, seed: int = 0,
           share: bool = False, device: str = "cpu", progress: bool = True) -> Path:
    """Write the auxiliary model folder `out` and return it.

    Layer-pruned by default (keep 0.5, bridge healing); `sibling` takes an existing smaller
    model instead. Calibration text is read only when healing or importance needs it. `share`
    leaves healing's activations for a fit in the same process (predictor/shared.py; `kvp run`).
    `device` "cuda" runs importance and healing on the GPU (same float32 math; the saved aux
    is the same up to rounding).
    """
    clock = Clock()
    out = check_output_dir(out, overwrite)
    keep, heal = check_recipe(keep, layers, select, heal, sibling)
    check_positive(calib_tokens=calib_tokens, distill_epochs=distill_epochs)
    if not distill_lr > 0:
        raise KvpError(f"distill-lr must be > 0, got {distill_lr}")
    check_paths(calib, "calibration")
    seed_all(seed)
    with clock.step("load"):
        base_dir = resolve(base)
        base_model, tok = load(base_dir)
    inputs = {"base": model_ref(base, base_dir)}
    recipe = {"keep": keep, "layers": layers, "select": select, "heal": heal, "seed": seed}
    if heal == "distill":
        recipe.update(distill_epochs=distill_epochs, distill_lr=distill_lr)
    if sibling is not None:
        aux, fields = _sibling(base_model, tok, sibling, inputs, clock)
    else:
        aux, fields = _layer_pruned(base_model, tok, keep, layers, select, calib, calib_tokens, inputs, clock,
                                    progress, heal=heal, distill_epochs=distill_epochs, distill_lr=distill_lr,
                                    share=share, device=device)
    if device != "cpu":
        recipe["device"] = device
    with clock.step("save"), atomic_dir(out, overwrite=overwrite) as tmp:
        aux.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(tmp, "aux", inputs=inputs, recipe=recipe, base_layers=ArchSpec.of(base_model).n_layers,
                       aux_layers=ArchSpec.of(aux).n_layers, **fields, **clock.record())
    return out


def _sibling(base_model, tok, sibling: str, inputs: dict, clock: Clock):
    """KVP-C: the sibling as it is, after checking it reads text exactly as the base does."""
    with clock.step("load_sibling"):
        sib_dir = resolve(sibling)
        aux, aux_tok = load(sib_dir)
    check_same_tokenizer(tok, aux_tok)
    inputs["sibling"] = model_ref(sibling, sib_dir)
    n_base, n_aux = ArchSpec.of(base_model).n_layers, ArchSpec.of(aux).n_layers
    fields = {"family": "c", "layer_map": {"kind": "c", "map": c_map(n_aux, n_base)},
              "healing": {"method": "none"}, "calib_tokens": 0}
    return aux, fields


def _layer_pruned(base_model, tok, keep, layers, select, calib, calib_tokens, inputs, clock, progress, **heal_args):
    """KVP-LP: choose the kept layers, copy them out of the base, heal."""
    n_base = ArchSpec.of(base_model).n_layers
    kept = check_layers(layers, n_base) if layers is not None else regular_layers(n_base, keep)
    seqs, scores = None, None
    if heal_args["heal"] != "none" or select == "importance":
        with clock.step("calibration"):
            seqs, inputs["calibration"] = calibration(tok, base_model, calib, calib_tokens)
    with compute_device(heal_args["device"]) as dev:
        base_model.to(dev)
        seqs = seqs.to(dev) if seqs is not None else None
        if select == "importance":
            with clock.step("importance"):
                kept, scores = importance_layers(base_model, seqs, n_keep=max(1, round(keep * n_base)))
        aux = prune(base_model, kept)
        with clock.step("heal"):
            stats = heal_aux(base_model, aux, kept, seqs, method=heal_args["heal"], progress=progress,
                             distill_epochs=heal_args["distill_epochs"], distill_lr=heal_args["distill_lr"],
                             share=heal_args["share"])
    aux.to("cpu")
    fields = {
        "family": "lp",
        "kept_layers": kept,
        "layer_map": {"kind": "lp", "map": lp_map(kept, n_base)},
        "importance": scores,
        "healing": stats,
        "calib_tokens": int(seqs.numel()) if seqs is not None else 0,
    }
    return aux, fields
