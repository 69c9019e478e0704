"""Periodic training checkpoints: atomic, verified, and resumable to the same result.

A checkpoint is a folder `step-NNNNNNNN/` in the run's checkpoint folder:
- `weights.safetensors`: the full trainee state (aux + predictor), never pickled;
- `state.pt`: optimizer state, step, loss history and RNG states: tensors and plain
  containers only, read back with `torch.load(weights_only=True)`;
- `best.safetensors` (with held-out evaluations): the trainee state at the best held-out
  loss so far, so a resumed run still returns the best weights;
- `meta.json`: the step, the plan, the inputs' hashes and the SHA-256 of every file.
It is built under a temporary name and renamed, so a run killed while saving leaves the
previous checkpoints intact. On loading, a file that does not match meta.json is refused as
corrupt, and a checkpoint of another plan or other inputs is refused as another run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import atomic_dir, sha256_file, write_json
from ..errors import KvpError
from .plan import TrainPlan

PREFIX = "step-"
WEIGHTS, STATE, META, BEST = "weights.safetensors", "state.pt", "meta.json", "best.safetensors"
KEEP = 2  # the latest and one before it


def steps_in(folder: str | Path) -> list[int]:
    """Steps of the checkpoints in `folder` (a step-* folder exists only once complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = (p.name.removeprefix(PREFIX) for p in folder.iterdir() if p.name.startswith(PREFIX))
    return sorted(int(s) for s in found if s.isdigit())


class Checkpoints:
    def __init__(self, folder: str | Path, plan: TrainPlan, inputs: dict):
        self.folder, self.plan, self.inputs = Path(folder), plan, inputs

    def steps(self) -> list[int]:
        return steps_in(self.folder)

    def path(self, step: int) -> Path:
        return self.folder / f"{PREFIX}{step:08d}"

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def clean_partial(self) -> None:
        """Leftovers of a run killed while saving."""
        if self.folder.is_dir():
            for p in self.folder.glob(f".{PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, weights: dict[str, torch.Tensor], state: dict,
             best: dict[str, torch.Tensor] | None = None) -> Path:
        with atomic_dir(self.path(step), overwrite=True) as tmp:  # a partial one is `.{PREFIX}*` (clean_partial)
            # clones: safetensors refuses tensors that share memory (tied embeddings)
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            if best is not None:
                save_file({k: v.detach().cpu().clone().contiguous() for k, v in best.items()}, str(tmp / BEST))
            torch.save(state, tmp / STATE)
            files = (WEIGHTS, STATE) + ((BEST,) if best is not None else ())
            write_json(tmp / META, {"step": step, "recipe": self.plan.to_dict(), "inputs": self.inputs,
                                    "files": {f: sha256_file(tmp / f) for f in files}})
        for old in self.steps()[:-KEEP]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return self.path(step)

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, state) of a checkpoint, after checking it is intact and of this run."""
        def corrupt(why: str) -> KvpError:
            return KvpError(f"corrupt checkpoint {path}: {why} (delete it to resume from an earlier one)")

        try:
            meta = json.loads((path / META).read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise corrupt(f"unreadable {META} ({type(e).__name__})") from None
        for name in (WEIGHTS, STATE, *((BEST,) if BEST in files else ())):
            if not (path / name).is_file():
                raise corrupt(f"{name} is missing")
            if sha256_file(path / name) != files.get(name):
                raise corrupt(f"{name} does not match the SHA-256 recorded when it was written")
        diffs = self.plan.differences(meta.get("recipe") or {})
        if diffs:
            raise KvpError(f"checkpoint {path} is from a run with another training plan ({diffs[0]}): resume with the "
                           "same options, or delete the checkpoint folder to start over")
        if meta.get("inputs") != self.inputs:
            changed = sorted(k for k in self.inputs if (meta.get("inputs") or {}).get(k) != self.inputs[k])
            raise KvpError(f"checkpoint {path} was trained from other inputs ({', '.join(changed)} changed): "
                           "delete the checkpoint folder to start over")
        try:
            weights = load_file(str(path / WEIGHTS))
            state = torch.load(path / STATE, map_location="cpu", weights_only=True)
            if BEST in files:
                state["best_weights"] = load_file(str(path / BEST))
        except Exception as e:  # noqa: BLE001 - the hashes matched, yet it does not parse
            raise corrupt(f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return weights, state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
