"""`kvp run RECIPE`: derive -> fit (or train) -> export -> validate into one run folder, cached per stage.

Run folder layout:
  RUN/recipe.yaml           the recipe as run (overrides applied, defaults filled in)
  RUN/run.json              summary: each stage (cached or ran, seconds, folder, key), gates, ok
  RUN/report.md             tables over variants and formats + the gates; pareto.png beside it
  RUN/compare.json          the table's rows, machine-readable (what `kvp compare` reads)
  RUN/stages/<stage>-<key>/ one artifact folder per stage (derive, fit, train, onnx, coreml,
                            validate-onnx, validate-coreml), written atomically by the stage
  RUN/junit.xml             with --junit (or wherever --junit points)

A stage's key is the hash of its recipe section, the manifests of the folders it reads and
the package version. A rerun finds a complete folder under that key and skips the stage; a
changed section (or an upstream stage that ran again) gives a new key, so the stage runs.
Stage folders are atomic, so an interrupted run resumes after its last finished stage; a
folder without its manifest / report (not one of ours) is removed and redone. Gates are not
part of the validation key: they are evaluated again on the cached report's metrics.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import __version__
from .artifacts import check_folder, sha256_file, write_json
from .errors import KvpError
from .recipe import Recipe, section_hash

RUN_JSON = "run.json"


@dataclass
class StageResult:
    name: str
    key: str
    folder: str
    status: str  # "cached" | "ran"
    seconds: float


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if not g["ok"]]


def _say(msg: str) -> None:
    print(f"kvp run: {msg}", file=sys.stderr, flush=True)


def _fingerprint(spec: str | None) -> object:
    """How a model or data path enters a key: a zoo name as it is (pinned by hash); a named corpus
    by its pins; a path by its files' names, sizes and modification times (cheap: no weights are read)."""
    if spec is None:
        return None
    from .corpus.spec import SOURCES

    if spec in SOURCES:  # a named corpus: its pins (and the package version, in every key) fix it
        return [spec, SOURCES[spec].key()]
    p = Path(spec)
    if not p.exists():
        return spec
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve())] + [[str(f.relative_to(p)) if f != p else f.name, f.stat().st_size,
                                  f.stat().st_mtime_ns] for f in files]


def _manifest_hash(folder: Path) -> str:
    return sha256_file(folder / "manifest.json")


def _complete(folder: Path, marker: str, stage: str | None) -> bool:
    path = folder / marker
    if not path.is_file():
        return False
    if stage is None:
        return True
    try:
        return json.loads(path.read_text()).get("stage") == stage
    except (OSError, ValueError, AttributeError):
        return False


class Runner:
    def __init__(self, recipe: Recipe, run_dir: Path, *, progress: bool = False, force: bool = False,
                 allow_unsafe_execution: bool = False):
        self.r = recipe
        self.allow_unsafe_execution = allow_unsafe_execution
        self.run_dir = Path(run_dir)
        self.stages_dir = self.run_dir / "stages"
        self.progress = progress
        self.force = force
        self.result = RunResult(self.run_dir)
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ one cached stage

    def stage(self, name: str, parts: list, fn, *, marker: str = "manifest.json", expect: str | None = None) -> Path:
        key = section_hash(name, __version__, *parts)[:12]
        folder = self.stages_dir / f"{name}-{key}"
        t = time.perf_counter()
        if folder.exists() and not self.force and _complete(folder, marker, expect):
            check_folder(folder)  # every file against the manifest: a changed cached folder is refused
            status = "cached"
            _say(f"{name}: cached ({folder.relative_to(self.run_dir)})")
        else:
            if folder.exists():
                _say(f"{name}: {folder.name} is incomplete or forced; redoing it")
                shutil.rmtree(folder)
            _say(f"{name}: running -> {folder.relative_to(self.run_dir)}")
            self.stages_dir.mkdir(parents=True, exist_ok=True)
            fn(folder)
            status = "ran"
        s = StageResult(name, key, str(folder.relative_to(self.run_dir)), status, round(time.perf_counter() - t, 2))
        if status == "ran":
            _say(f"{name}: done in {s.seconds:.1f} s")
        self.result.stages.append(s)
        self.write_summary(final=False)
        return folder

    # ------------------------------------------------------------------ the pipeline

    def run(self) -> RunResult:
        r, seed = self.r, self.r.seed
        if r.validate.enabled and "humaneval" in r.validate.checks:  # refused before any stage, not hours later
            from kvp_validate.sandbox import layers

            layers(self.allow_unsafe_execution)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(r.dump(), sort_keys=False))
        calib = list(r.data.calib)
        calib_fp = [_fingerprint(p) for p in calib]
        heldout = list(r.data.heldout)
        heldout_fp = [_fingerprint(p) for p in heldout]

        def do_derive(out: Path) -> None:
            from .derive import derive

            a = r.aux
            derive(out, base=r.base, keep=a.keep, layers=a.layers, select=a.select, heal=a.heal,
                   sibling=a.sibling, calib=calib, calib_tokens=r.data.calib_tokens, distill_epochs=a.distill_epochs,
                   distill_lr=a.distill_lr, seed=seed, share=True, progress=self.progress)

        aux = self.stage("derive", [r.base, _fingerprint(r.base), _fingerprint(r.aux.sibling), r.aux.model_dump(),
                                    calib_fp, r.data.calib_tokens, seed], do_derive, expect="aux")

        def do_fit(out: Path) -> None:
            from .predictor.fit import fit

            f = r.fit
            fit(aux, out, input_mode=f.input, sink_len=f.sink, sources=f.sources, calib=calib,
                calib_tokens=r.data.calib_tokens, seed=seed, progress=self.progress)

        pred = self.stage("fit", [r.fit.model_dump(), _manifest_hash(aux), calib_fp, r.data.calib_tokens, seed],
                          do_fit, expect="predictor")
        from .predictor import shared

        shared.clear()  # derive's activations (several GB) served the fit, or a cached fit needed none

        if r.predictor.method == "train":
            def do_train(out: Path) -> None:
                from .train import train

                t = r.train.model_dump()
                train(out, predictor=pred, data=calib, checkpoint_dir=out.with_name(out.name + ".ckpt"),
                      resume=True, seed=seed, progress=self.progress, **t)

            pred = self.stage("train", [r.train.model_dump(), _manifest_hash(pred), calib_fp, seed], do_train,
                              expect="predictor")

        onnx_dir = coreml_dir = None
        if r.export.onnx.enabled:
            def do_onnx(out: Path) -> None:
                from .export.onnx_export import export_onnx

                o = r.export.onnx
                export_onnx(pred, out, variants=r.onnx_variants(), block_size=o.block_size,
                            accuracy_level=o.accuracy_level, int8_method=o.int8_method, int4_method=o.int4_method,
                            eval_n=o.eval_n, prompt_len=o.prompt_len, cont_len=o.cont_len, heldout=heldout,
                            seed=seed, progress=self.progress)

            onnx_dir = self.stage("onnx", [r.export.onnx.model_dump(), _manifest_hash(pred), heldout_fp, seed],
                                  do_onnx, expect="onnx")
        if r.export.coreml.enabled:
            def do_coreml(out: Path) -> None:
                from .export.coreml.export import export_coreml

                c = r.export.coreml
                export_coreml(pred, out, context=c.context, prompt_lengths=c.prompt_lengths, targets=c.targets,
                              compressions=c.compress, block_size=c.block_size, group_size=c.group_size,
                              heldout=heldout, seed=seed, progress=self.progress)

            coreml_dir = self.stage("coreml", [r.export.coreml.model_dump(), _manifest_hash(pred), heldout_fp, seed],
                                    do_coreml, expect="coreml")

        reports: dict[str, dict] = {}
        v = r.validate
        if v.enabled and onnx_dir is not None:
            gates = r.onnx_gates()

            def do_validate(out: Path) -> None:
                from kvp_validate.onnx_report import validate_onnx

                validate_onnx(onnx_dir, out, variants=r.onnx_variants(), checks=tuple(v.checks), gates=gates,
                              threads=v.threads, quality_n=v.quality_n, greedy_tokens=v.greedy_tokens,
                              lengths=tuple(v.lengths), batches=tuple(v.batches), warmup=v.warmup, repeats=v.repeats,
                              humaneval_limit=v.humaneval_limit, tolerances=v.tolerances,
                              coldstart_lengths=tuple(v.coldstart_lengths), progress=self.progress,
                              allow_unsafe_execution=self.allow_unsafe_execution)

            section = v.model_dump(exclude={"gates"})
            folder = self.stage("validate-onnx", [section, _manifest_hash(onnx_dir)], do_validate,
                                marker="report.json")
            reports["onnx"] = self._gate(folder, gates)
        if v.enabled and coreml_dir is not None:
            def do_validate_coreml(out: Path) -> None:
                from kvp_validate.coreml import validate_coreml

                validate_coreml(coreml_dir, out, repeats=v.repeats)

            folder = self.stage("validate-coreml", [v.repeats, _manifest_hash(coreml_dir)], do_validate_coreml,
                                marker="report.json")
            payload = json.loads((folder / "report.json").read_text())
            if v.gates.parity:
                self.result.gates.append({"gate": "coreml.ok==1", "key": "coreml.ok", "value": float(payload["ok"]),
                                          "ok": bool(payload["ok"])})
            reports["coreml"] = payload
        self.result.seconds = round(time.perf_counter() - self.t0, 2)
        self.write_summary(final=True)
        self.write_report()
        return self.result

    def _gate(self, folder: Path, gates: list[str]) -> dict:
        """The recipe's gates, evaluated on the (possibly cached) report's metrics."""
        from kvp_validate.gates import Gate, evaluate

        payload = json.loads((folder / "report.json").read_text())
        self.result.gates += evaluate([Gate.parse(g) for g in gates], payload.get("metrics", {}))
        return payload

    # ------------------------------------------------------------------ outputs

    def summary(self, final: bool) -> dict:
        res = self.result
        return {
            "recipe": self.r.label(),
            "base": self.r.base,
            "kvp_export": __version__,
            "complete": final,
            "seconds": round(time.perf_counter() - self.t0, 2),
            "stages": [asdict(s) for s in res.stages],
            "gates": res.gates,
            "ok": not res.failed_gates,
        }

    def write_summary(self, final: bool) -> None:
        write_json(self.run_dir / RUN_JSON, self.summary(final))

    def write_report(self) -> None:
        from .compare import render, rows_from_run

        rows = rows_from_run(self.run_dir)
        render(rows, self.run_dir, title=f"Run {self.r.label()}", stem="compare",
               extra_md=self.report_header(), md_name="report.md")

    def report_header(self) -> str:
        from kvp_validate.report import md_table

        res = self.result
        lines = [f"Recipe `{self.r.label()}`, base `{self.r.base}`, kvp-export {__version__}; "
                 f"{res.seconds:.1f} s in all.", "", "## Stages", ""]
        lines.append(md_table(["stage", "status", "seconds", "folder"],
                              [[s.name, s.status, s.seconds, s.folder] for s in res.stages], 2))
        if res.gates:
            lines += ["", "## Gates", ""]
            lines.append(md_table(["gate", "metric", "measured", ""],
                                  [[g["gate"], g["key"], g["value"], "pass" if g["ok"] else "FAIL"] for g in res.gates],
                                  4))
        return "\n".join(lines)


def default_run_dir(recipe: Recipe, path: Path) -> Path:
    return Path("runs") / recipe.label(path)


def junit_suites(result: RunResult, run_dir: Path) -> list:
    from kvp_validate.junit import Case, Suite, gate_cases, report_suites

    suites = [Suite("run.stages", [Case("run.stages", s.name, seconds=s.seconds, output=f"{s.status}: {s.folder}")
                                   for s in result.stages])]
    for s in result.stages:
        if s.name == "validate-onnx":
            payload = json.loads((run_dir / s.folder / "report.json").read_text())
            suites += [x for x in report_suites(payload, "onnx") if not x.name.endswith(".gates")]
        if s.name == "validate-coreml":
            payload = json.loads((run_dir / s.folder / "report.json").read_text())
            suites += report_suites(payload, "coreml")
    if result.gates:
        suites.append(Suite("run.gates", gate_cases(result.gates, "run.gates")))
    return suites


def run_recipe(recipe: Recipe, run_dir: Path, *, progress: bool = False, force: bool = False,
               junit: Path | None = None, allow_unsafe_execution: bool = False) -> RunResult:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise KvpError(f"run folder path exists and is not a folder: {run_dir}")
    result = Runner(recipe, run_dir, progress=progress, force=force,
                    allow_unsafe_execution=allow_unsafe_execution).run()
    if junit is not None:
        from kvp_validate.junit import write_junit

        write_junit(junit, junit_suites(result, run_dir), name=f"kvp run {recipe.label()}")
    return result
