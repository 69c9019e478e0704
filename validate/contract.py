"""The artifact contract: what each folder's manifest.json holds, as typed models.

Every folder kvp-export or the validator writes carries `manifest.json` (the file names below
are the only place they are written). Its common part (`Manifest`: stage, created, versions,
inputs, recipe, files, timings) is the same for every stage; each stage adds its facts
(`AuxManifest`, `PredictorManifest`, `OnnxManifest`, `CoremlManifest`, `EvalManifest`,
`ValidationManifest`). Writers check what they write against the model of its stage
(`check_manifest`, from `kvp_export.artifacts.write_manifest` and `report.write_report_folder`),
and readers get the typed model (`parse_manifest`), so a field the writer drops or renames
fails where it is written, not in a reader three stages later.

The models accept fields they do not name (`extra="allow"`): a manifest may carry more than a
reader needs, and folders written by any 0.3.x release stay readable. The on-disk JSON is the
writer's dict, unchanged. What a field means: docs/architecture.md, "The manifest contract".
Imports no torch.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import KvpError
from .integrity import MANIFEST

REPORT_JSON = "report.json"  # a report's measurements, metrics and gates (machine-readable)
REPORT_MD = "report.md"  # the same report for a person
RUN_JSON = "run.json"  # `kvp run`'s summary of its stages and gates
__all__ = ["MANIFEST", "REPORT_JSON", "REPORT_MD", "RUN_JSON", "Manifest", "check_manifest", "parse_manifest"]


class _Open(BaseModel):
    """A section of a manifest: the fields named here are checked, others are kept as they are."""

    model_config = ConfigDict(extra="allow")


class Manifest(_Open):
    """What every manifest records (docs/architecture.md, "The manifest contract")."""

    stage: str
    created: str | None = None  # UTC, ISO 8601
    versions: dict[str, str] = {}  # the stack that wrote the folder
    inputs: dict[str, Any] = {}  # each folder, model or corpus read, with its hashes
    recipe: dict[str, Any] = {}  # the options that made the folder
    # every other file -> {bytes, sha256}; its shape is integrity.listed's to check (one rule, one
    # message); None only in model caches written before 0.3
    files: dict[str, Any] | None = None
    wall_seconds: float | None = None
    step_seconds: dict[str, float] = {}


class ModelManifest(Manifest):
    """A model converted into the cache (`kvp models pull`, a GGUF given as --base)."""

    stage: Literal["model"]


class LayerMap(_Open):
    kind: str  # "lp" (layer-pruned aux) or "c" (a sibling model)
    map: list[int]  # base layer -> the aux layer that predicts its cache


class AuxManifest(Manifest):
    stage: Literal["aux"]
    layer_map: LayerMap
    kept_layers: list[int] | None = None  # a layer-pruned aux: the base layers it kept


class PredictorManifest(Manifest):
    stage: Literal["predictor"]
    layer_map: LayerMap
    input_mode: str
    sink_len: int
    fit_report: dict[str, Any] | None = None


class ExportModel(_Open):
    """The model facts a runtime needs to drive an export's graphs or packages."""

    model_type: str
    base_layers: int
    aux_layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    sink_len: int
    eos_token_ids: list[int]
    pad_token_id: int | None = None
    windows: list[int | None] = []  # per base layer, its sliding window (None: full); [] before 0.3.1
    tail: int = 0  # KVP's exact tail: the base reads the prompt's last tail+1 tokens (0 before 0.3.3)


class TokenizerRef(_Open):
    folder: str
    sha256: str  # of folder/tokenizer.json


class FileRef(_Open):
    file: str  # relative to the export folder


class EvalPairs(FileRef):
    n: int
    prompt_len: int
    cont_len: int


class GraphIO(_Open):
    inputs: list[str]  # required, in the graph's order
    outputs: list[str]
    # inputs the graph gives a default (an initializer of the same name, overridable in onnxruntime):
    # a runtime that does not know them leaves them out. base_decode's `logits_to_keep` (0 = the
    # logits of every position, N = of the last N); exports before 0.3.2 have none.
    optional: list[str] = []


class Graph(_Open):
    file: str  # VARIANT/NAME.onnx
    bytes: int  # the graph's files together
    sha256: dict[str, str]  # file name in VARIANT/ -> SHA-256 (the graph and its .data)


class OptimizedGraph(_Open):
    """A graph onnxruntime has already optimised (optimized/VARIANT/NAME.onnx), valid while both match."""

    file: str
    bytes: int  # the .onnx file alone (its .data is listed in the manifest's `files`)
    source_sha256: dict[str, str]  # the source graph's `sha256` when it was optimised
    onnxruntime: str  # the version that optimised it


class GraphFlops(_Open):
    """A graph's FLOPs as polynomial coefficients in `variable` (prompt_len or past_len)."""

    variable: str
    coef: list[float] = []  # prefill graphs
    step: list[float] = []  # decoders: one step at a past length
    first_step: list[float] = []  # base_decode: the first step after a KVP prefill (sink, model.tail and last tokens)


class Crossover(_Open):
    prompt_len: int | None = None  # KVP from here on in the default mode; None: never measured to win
    points: list[dict[str, Any]] = []


class OnnxManifest(Manifest):
    stage: Literal["onnx"]
    model: ExportModel
    tokenizer: TokenizerRef
    io: dict[str, GraphIO]  # graph name -> its input and output names
    variants: dict[str, dict[str, Graph]]  # variant -> graph name -> files
    optimized: dict[str, dict[str, OptimizedGraph | None]] = {}
    flops: dict[str, GraphFlops] = {}
    reference: FileRef
    eval: EvalPairs
    crossover: dict[str, Crossover] = {}  # per variant, measured at export


class CoremlModel(ExportModel):
    prompt_lengths: list[int]
    cache_shape: list[int]


class CoremlPackage(_Open):
    path: str


class CoremlVariant(_Open):
    target: str
    compression: str
    stateful: bool
    multifunction: bool
    bytes: int
    packages: dict[str, CoremlPackage]  # role ("kvp" or "prefill"/"decode") -> package
    weights: dict[str, Any]


class CoremlManifest(Manifest):
    stage: Literal["coreml"]
    model: CoremlModel
    variants: dict[str, CoremlVariant]
    checks: dict[str, Any]
    reference: FileRef


class EvalManifest(Manifest):
    """`kvp eval`'s report folder."""

    stage: Literal["report"]


class ValidationManifest(Manifest):
    """A validation report folder (`kvp validate`, kvp-validate): its files, and the export it read."""

    stage: Literal["validation"]


class GenaiKvpInputs(_Open):
    """What a genai-kvp folder was built from: the export, and its two graphs' `Graph.sha256`."""

    export: str
    variant: str
    kvp_prefill: dict[str, str]
    base_decode: dict[str, str]


class GenaiKvpManifest(Manifest):
    """`<export>/<variant>/genai-kvp/`: KVP as an onnxruntime-genai pipeline (export/genai_kvp.py)."""

    stage: Literal["genai-kvp"]
    inputs: GenaiKvpInputs


class GateResult(_Open):
    gate: str  # as given: KEY OP VALUE
    key: str  # the metric it matched (a gate with `*` gives one result per key)
    value: float | None  # None: no such metric in the report (the gate fails)
    ok: bool


class OnnxReport(_Open):
    """report.json of an ONNX validation (onnx_report.validate_onnx)."""

    export: str  # the export folder, resolved
    created: str
    machine: dict[str, Any]
    variants: list[str]
    model: dict[str, Any]
    results: dict[str, dict[str, Any]]  # check -> variant -> its measurements
    metrics: dict[str, float]  # the flat keys gates address (metrics.py)
    gates: list[GateResult]
    ok: bool


class CoremlReport(_Open):
    """report.json of a Core ML validation (coreml.validate_coreml)."""

    export: str
    linux_checks: dict[str, dict[str, Any]]  # variant -> the checks any host runs
    macos: dict[str, Any]  # measured on macOS, or why not
    ok: bool


MANIFESTS: dict[str, type[Manifest]] = {m.model_fields["stage"].annotation.__args__[0]: m for m in (
    ModelManifest, AuxManifest, PredictorManifest, OnnxManifest, CoremlManifest, EvalManifest, ValidationManifest,
    GenaiKvpManifest)}


def now() -> str:
    """A manifest's `created`: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions(dists: tuple[str, ...], own: dict[str, str]) -> dict[str, str]:
    """A manifest's `versions`: python, the installed `dists` (read from package metadata: importing
    coremltools or onnxruntime only for a version would cost seconds and print warnings; an
    optional one absent is left out) and `own` (the writing package's version)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out | own


def _why(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"'{where}': {err['msg'].lower()}"


def _validated(model: type[BaseModel], raw: dict, what: str):
    """`raw` as `model`, or a one-line error: `what`, then the first field that breaks it."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise KvpError(f"{what} {_why(e)}") from None


def parse_manifest(raw: dict, folder: str | Path, stage: str | None = None) -> Manifest:
    """The typed manifest of the folder's stage (`stage`, if given, must be it); one-line errors."""
    got = raw.get("stage")
    if stage is not None and got != stage:
        raise KvpError(f"{folder} is a '{got}' artifact, expected '{stage}'")
    model = MANIFESTS.get(got, Manifest) if isinstance(got, str) else Manifest
    return _validated(model, raw, f"manifest {Path(folder) / MANIFEST} breaks the '{got}' contract at")


def read_json(path: str | Path, what: str = "") -> dict:
    """A JSON object from a file; one-line errors for a missing or unreadable file or another JSON value."""
    what = f"{what} " if what else ""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError covers JSON and Unicode decoding errors
        raise KvpError(f"unreadable {what}{path}: {e}") from None
    if not isinstance(obj, dict):
        raise KvpError(f"unreadable {what}{path}: a JSON object expected, got {type(obj).__name__}")
    return obj


def read_report(folder: str | Path) -> OnnxReport | CoremlReport:
    """A validation report folder's report.json, typed; one-line errors for a missing or bad one."""
    path = Path(folder) / REPORT_JSON
    raw = read_json(path)
    return _validated(CoremlReport if "linux_checks" in raw else OnnxReport, raw, f"{path} is not a validation report:")


def check_manifest(raw: dict) -> dict:
    """The manifest a writer is about to write, checked against its stage's model; returned unchanged."""
    try:
        MANIFESTS[raw["stage"]].model_validate(raw)
    except ValidationError as e:
        raise AssertionError(f"a '{raw['stage']}' manifest written against the contract: {_why(e)}") from None
    return raw
