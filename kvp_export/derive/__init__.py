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
from ..config import SEED, DataConfig, DeriveConfig, configure
from ..models import DEFAULT_MODEL, check_same_tokenizer
from ..models.arch import ArchSpec, adapter
from ..predictor.layermap import c_map, lp_map
from ..stage import Clock, calibration, check_paths, compute_device, load_model, seed_all
from .heal import heal as heal_aux
from .prune import check_layers, importance_layers, loss_layers, prune, regular_layers


def derive(out: str | Path, config: DeriveConfig | None = None, *, base: str = DEFAULT_MODEL,
           data: DataConfig | None = None, overwrite: bool = False, seed: int = SEED, share: bool = False,
           progress: bool = True, **options) -> Path:
    """Write the auxiliary model folder `out` and return it.

    `config` (or `options`, its fields by name, e.g. keep=0.25; `data`'s too: calib=[...]) says
    how: layer-pruned by default (keep 0.5, bridge healing), or an existing smaller `sibling`.
    Calibration text (`data.calib`) is read only when healing or importance needs it. `share`
    leaves healing's activations for a fit in the same process (predictor/shared.py; `kvp run`).
    """
    clock = Clock()
    out = check_output_dir(out, overwrite)
    cfg, data = configure(options, (DeriveConfig, config), (DataConfig, data))
    keep_ratio, heal = cfg.keep_ratio, cfg.healing
    check_paths(data.calib, "calibration")
    seed_all(seed)
    with clock.step("load"):
        base_model, tok, base_ref = load_model(base)
    inputs = {"base": base_ref}
    recipe = {"keep": keep_ratio, "layers": cfg.layers, "select": cfg.select, "heal": heal, "seed": seed}
    if heal == "distill":
        recipe.update(distill_epochs=cfg.distill_epochs, distill_lr=cfg.distill_lr)
    if cfg.device != "cpu":
        recipe["device"] = cfg.device
    if cfg.sibling is not None:
        aux, fields = _sibling(base_model, tok, cfg.sibling, inputs, clock)
    else:
        aux, fields = _layer_pruned(base_model, tok, keep_ratio, cfg.layers, cfg.select, data.calib or None,
                                    data.calib_tokens, inputs, clock, progress, heal=heal,
                                    distill_epochs=cfg.distill_epochs, distill_lr=cfg.distill_lr, share=share,
                                    device=cfg.device)
    with clock.step("save"), atomic_dir(out, overwrite=overwrite) as tmp:
        aux.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(tmp, "aux", inputs=inputs, recipe=recipe, base_layers=ArchSpec.of(base_model).n_layers,
                       aux_layers=ArchSpec.of(aux).n_layers, **fields, **clock.record())
    return out


def _sibling(base_model, tok, sibling: str, inputs: dict, clock: Clock):
    """KVP-C: the sibling as it is, after checking it reads text exactly as the base does."""
    with clock.step("load_sibling"):
        aux, aux_tok, inputs["sibling"] = load_model(sibling)
    check_same_tokenizer(tok, aux_tok)
    n_base, n_aux = ArchSpec.of(base_model).n_layers, ArchSpec.of(aux).n_layers
    fields = {"family": "c", "layer_map": {"kind": "c", "map": c_map(n_aux, n_base)},
              "healing": {"method": "none"}, "calib_tokens": 0}
    return aux, fields


def _layer_pruned(base_model, tok, keep_ratio, layers, select, calib, calib_tokens, inputs, clock, progress, **heal_args):
    """KVP-LP: choose the kept layers, copy them out of the base, heal."""
    n_base = ArchSpec.of(base_model).n_layers
    kept = check_layers(layers, n_base) if layers is not None else regular_layers(n_base, keep_ratio, adapter(base_model).required_layers())
    seqs, scores = None, None
    if heal_args["heal"] != "none" or select != "regular":
        with clock.step("calibration"):
            seqs, inputs["calibration"] = calibration(tok, base_model, calib, calib_tokens)
    with compute_device(heal_args["device"]) as dev:  # "cuda": importance and healing on the GPU
        base_model.to(dev)
        seqs = seqs.to(dev) if seqs is not None else None
        if select != "regular" and layers is None:
            rank = importance_layers if select == "importance" else loss_layers
            with clock.step("importance"):
                kept, scores = rank(base_model, seqs, n_keep=max(1, round(keep_ratio * n_base)))
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
