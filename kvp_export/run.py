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

import importlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvp_validate.contract import MANIFEST, REPORT_JSON, REPORT_MD, RUN_JSON, read_json, read_report

from . import __version__
from .artifacts import check_folder, sha256_file, write_json
from .config import DataConfig
from .errors import KvpError
from .log import get_logger
from .recipe import Gates, RunConfig, section_hash

log = get_logger("run")



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


def _function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _fingerprint(spec: str | None) -> object:
    """How a model or data path enters a key: a zoo name as it is (pinned by hash); a named corpus
    by its pins; a path by its files' names, sizes and modification times (cheap: no weights are read)."""
    if spec is None:
        return None
    from .corpus.spec import CORPORA

    if spec in CORPORA:  # a named corpus: its pins (and the package version, in every key) fix it
        return [spec, CORPORA[spec].key()]
    p = Path(spec)
    if not p.exists():
        return spec
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve())] + [[str(f.relative_to(p)) if f != p else f.name, f.stat().st_size,
                                  f.stat().st_mtime_ns] for f in files]


def _manifest_hash(folder: Path) -> str:
    return sha256_file(folder / MANIFEST)


def _complete(folder: Path, marker: str, stage: str | None) -> bool:
    path = folder / marker
    if not path.is_file():
        return False
    if stage is None:
        return True
    try:
        return read_json(path).get("stage") == stage
    except KvpError:
        return False


def _validate_onnx(onnx: Path, out: Path, config, *, variants: list[str], progress: bool = False,
                   allow_unsafe_execution: bool = False) -> None:
    """The validate-onnx stage: the recipe's validate section, measured. Its gates are not passed:
    the runner evaluates them on the report, cached or not, so they stay out of the key."""
    from kvp_validate.onnx_report import validate_onnx
    from kvp_validate.options import OPTIONS

    measure = {o.name: tuple(x) if isinstance(x := getattr(config, o.name), list) else x for o in OPTIONS}
    validate_onnx(onnx, out, variants=variants, checks=tuple(config.checks), tolerances=config.tolerances,
                  progress=progress, allow_unsafe_execution=allow_unsafe_execution, **measure)


def _validate_coreml(coreml: Path, out: Path, config, *, progress: bool = False,
                     allow_unsafe_execution: bool = False) -> None:
    from kvp_validate.coreml import validate_coreml

    validate_coreml(coreml, out, repeats=config)


def _clear_shared() -> None:
    from .predictor import shared

    shared.clear()  # derive's activations (several GB) served the fit, or a cached fit needed none


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline. The function is called as
    `function(**{param: folder for param, output in inputs}, out=FOLDER, config=SECTION, **args(recipe),
    progress=..., **extra)`; the stage's key hashes exactly the inputs' manifests, the section and
    the args (with the files that `paths` names fingerprinted), and the package version. `extra`
    (progress, sharing, the sandbox opt-in) changes how a stage runs, not what it writes."""

    name: str  # the stage folder's prefix and its name in run.json
    inputs: dict[str, str]  # the function's parameter -> the output of an earlier stage it reads
    section: Callable[[RunConfig], Any]  # the config it receives: a recipe section, unchanged
    function: str  # "module:function", imported when the stage runs (torch stays unloaded until then)
    output: str  # what later stages call its folder
    args: Callable[[RunConfig], dict] = lambda r: {}
    paths: tuple[str, ...] = ()  # dotted keys of args / "config." whose strings name files or corpora
    when: Callable[[RunConfig], bool] = lambda r: True
    expect: str | None = None  # the manifest's stage, for a complete folder
    marker: str = MANIFEST
    extra: Callable[[Runner], dict] = lambda runner: {}
    after: Callable[[], None] | None = None


def _calib(r: RunConfig) -> DataConfig:
    return DataConfig(calib=r.data.calib, calib_tokens=r.data.calib_tokens)


STAGES = (
    Stage("derive", {}, lambda r: r.aux, "kvp_export.derive:derive", "aux",
          args=lambda r: {"base": r.base, "data": _calib(r), "seed": r.seed},
          paths=("base", "config.sibling", "data.calib"), expect="aux", extra=lambda runner: {"share": True}),
    Stage("fit", {"aux": "aux"}, lambda r: r.fit, "kvp_export.predictor.fit:fit", "predictor",
          args=lambda r: {"data": _calib(r), "seed": r.seed}, paths=("data.calib",), expect="predictor",
          after=_clear_shared),
    Stage("train", {"predictor": "predictor"}, lambda r: r.train, "kvp_export.train:train", "predictor",
          args=lambda r: {"data": list(r.data.calib), "seed": r.seed}, paths=("data",),
          when=lambda r: r.predictor.method == "train", expect="predictor", extra=lambda runner: {"resume": True}),
    Stage("onnx", {"predictor": "predictor"}, lambda r: r.export.onnx, "kvp_export.export.onnx_export:export_onnx", "onnx",
          args=lambda r: {"heldout": list(r.data.heldout), "seed": r.seed}, paths=("heldout",),
          when=lambda r: r.export.onnx.enabled, expect="onnx"),
    Stage("coreml", {"predictor": "predictor"}, lambda r: r.export.coreml, "kvp_export.export.coreml.export:export_coreml",
          "coreml", args=lambda r: {"heldout": list(r.data.heldout), "seed": r.seed}, paths=("heldout",),
          when=lambda r: r.export.coreml.enabled, expect="coreml"),
    Stage("validate-onnx", {"onnx": "onnx"}, lambda r: r.validate.model_copy(update={"gates": Gates()}),
          "kvp_export.run:_validate_onnx", "report-onnx", args=lambda r: {"variants": r.onnx_variants()},
          when=lambda r: r.validate.enabled and r.export.onnx.enabled, marker=REPORT_JSON,
          extra=lambda runner: {"allow_unsafe_execution": runner.allow_unsafe_execution}),
    Stage("validate-coreml", {"coreml": "coreml"}, lambda r: r.validate.repeats, "kvp_export.run:_validate_coreml",
          "report-coreml", when=lambda r: r.validate.enabled and r.export.coreml.enabled, marker=REPORT_JSON),
)


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _key_parts(stage: Stage, inputs: dict[str, Path], config: Any, args: dict) -> dict:
    """What the stage's function receives, as its key sees it: input folders by their manifests,
    the section and args as JSON, and every named file or corpus by its fingerprint."""
    received = {"config": config.model_dump(mode="json") if hasattr(config, "model_dump") else config,
                **{k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in args.items()}}
    files = {}
    for dotted in stage.paths:
        value = _get(received, dotted)
        files[dotted] = [_fingerprint(p) for p in value] if isinstance(value, list) else _fingerprint(value)
    return {"inputs": {k: _manifest_hash(f) for k, f in inputs.items()}, "received": received, "files": files}


class Runner:
    def __init__(self, recipe: RunConfig, run_dir: Path, *, progress: bool = False, force: bool = False,
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

    def stage(self, name: str, parts: Any, fn, *, marker: str = MANIFEST, expect: str | None = None) -> Path:
        key = section_hash(name, __version__, parts)[:12]
        folder = self.stages_dir / f"{name}-{key}"
        t = time.perf_counter()
        if folder.exists() and not self.force and _complete(folder, marker, expect):
            check_folder(folder)  # every file against the manifest: a changed cached folder is refused
            status = "cached"
            log.info(f"{name}: cached ({folder.relative_to(self.run_dir)})")
        else:
            if folder.exists():
                log.info(f"{name}: {folder.name} is incomplete or forced; redoing it")
                shutil.rmtree(folder)
            log.info(f"{name}: running -> {folder.relative_to(self.run_dir)}")
            self.stages_dir.mkdir(parents=True, exist_ok=True)
            fn(folder)
            status = "ran"
        s = StageResult(name, key, str(folder.relative_to(self.run_dir)), status, round(time.perf_counter() - t, 2))
        if status == "ran":
            log.info(f"{name}: done in {s.seconds:.1f} s")
        self.result.stages.append(s)
        self.write_summary(final=False)
        return folder

    # ------------------------------------------------------------------ the pipeline

    def run(self) -> RunResult:
        r = self.r
        if r.validate.enabled and "humaneval" in r.validate.checks:  # refused before any stage, not hours later
            from kvp_validate.sandbox import layers

            layers(self.allow_unsafe_execution)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(r.dump(), sort_keys=False))
        outputs: dict[str, Path] = {}
        for st in STAGES:
            if not st.when(r):
                continue
            inputs = {param: outputs[out] for param, out in st.inputs.items()}
            config, args = st.section(r), st.args(r)
            function = _function(st.function)

            def call(folder: Path, st=st, inputs=inputs, config=config, args=args, function=function) -> None:
                function(**inputs, out=folder, config=config, **args, progress=self.progress, **st.extra(self))

            outputs[st.output] = self.stage(st.name, _key_parts(st, inputs, config, args), call, marker=st.marker,
                                            expect=st.expect)
            if st.after is not None:
                st.after()
        gates = r.onnx_gates() if "report-onnx" in outputs else []
        if gates:
            self._gate(outputs["report-onnx"], gates)
        if "report-coreml" in outputs and r.validate.gates.parity:
            ok = read_report(outputs["report-coreml"]).ok
            self.result.gates.append({"gate": "coreml.ok==1", "key": "coreml.ok", "value": float(ok), "ok": ok})
        self.result.seconds = round(time.perf_counter() - self.t0, 2)
        self.write_summary(final=True)
        self.write_report()
        return self.result

    def _gate(self, folder: Path, gates: list[str]) -> None:
        """The recipe's gates, evaluated on the (possibly cached) report's metrics."""
        from kvp_validate.gates import Gate, evaluate

        self.result.gates += evaluate([Gate.parse(g) for g in gates], read_report(folder).metrics)

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
               extra_md=self.report_header(), md_name=REPORT_MD)

    def report_header(self) -> str:
        from kvp_validate.report import gates_table, md_table

        res = self.result
        lines = [f"Recipe `{self.r.label()}`, base `{self.r.base}`, kvp-export {__version__}; "
                 f"{res.seconds:.1f} s in all.", "", "## Stages", ""]
        lines.append(md_table(["stage", "status", "seconds", "folder"],
                              [[s.name, s.status, s.seconds, s.folder] for s in res.stages], 2))
        if res.gates:
            lines += ["", "## Gates", "", gates_table(res.gates)]
        return "\n".join(lines)


def default_run_dir(recipe: RunConfig, path: Path) -> Path:
    return Path("runs") / recipe.label(path)


def junit_suites(result: RunResult, run_dir: Path) -> list:
    from kvp_validate.junit import Case, Suite, gate_cases, report_suites

    suites = [Suite("run.stages", [Case("run.stages", s.name, seconds=s.seconds, output=f"{s.status}: {s.folder}")
                                   for s in result.stages])]
    for s in result.stages:
        if s.name == "validate-onnx":
            payload = read_json(run_dir / s.folder / REPORT_JSON)
            suites += [x for x in report_suites(payload, "onnx") if not x.name.endswith(".gates")]
        if s.name == "validate-coreml":
            suites += report_suites(read_json(run_dir / s.folder / REPORT_JSON), "coreml")
    if result.gates:
        suites.append(Suite("run.gates", gate_cases(result.gates, "run.gates")))
    return suites


def run_recipe(recipe: RunConfig, run_dir: Path, *, progress: bool = False, force: bool = False,
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
