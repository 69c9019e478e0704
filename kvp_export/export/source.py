"""What an export reads: the predictor folder's pipeline, and its record in the export's manifest."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import sha256_file
from ..runtime.pipeline import KVPPipeline
from ..stage import Clock, model_ref, seed_all


def load_source(predictor: str | Path, seed: int, clock: Clock) -> KVPPipeline:
    """The predictor with its aux and base (found through its manifest), after seeding."""
    seed_all(seed)
    with clock.step("load"):
        return KVPPipeline.from_predictor(predictor)


def source_inputs(pipe: KVPPipeline, predictor: str | Path) -> dict:
    """The export manifest's `inputs`: the predictor file's SHA-256, the aux and the base as recorded."""
    return {
        "predictor": {"path": str(Path(predictor).resolve()),
                      "sha256": sha256_file(Path(predictor) / "predictor.safetensors")},
        "aux": model_ref(pipe.aux_dir, pipe.aux_dir),
        "base": pipe.manifest["inputs"]["base"],
    }
