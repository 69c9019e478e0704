"""Recipes: one YAML file that describes a whole run (derive -> fit/train -> export -> validate).

A recipe is validated by a typed schema (pydantic v2, unknown keys refused) with cross-field
checks, before any work starts. Errors are one line naming the recipe file, the YAML line and
the field path (`recipes/x.yaml:7: aux.keep: ...`). Command-line overrides (`--set
fit.sink=2`) are parsed as YAML scalars and validated the same way; an error in one names the
override. recipes/README.md documents every field.

Imports no torch: loading and checking a recipe is instant.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import KvpError
from .limits import check_tree

ONNX_VARIANTS = ("fp32", "int8", "int4")
COREML_COMPRESSIONS = ("fp16", "int8", "int4", "palettize4")
COREML_NEEDS_IOS18 = {"int4": "per-block int4 quantization", "palettize4": "grouped-channel palettization"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Data(Strict):
    """Calibration / held-out text: files, folders or JSONL, or a named corpus such as `pypi-code`
    (default: stdlib + Shakespeare)."""

    calib: list[str] = Field(default_factory=list)
    calib_tokens: int = Field(100_000, ge=1)
    heldout: list[str] = Field(default_factory=list)


class Aux(Strict):
    """The auxiliary model: a layer-pruned base (keep or layers) or a smaller sibling model."""

    keep: float | None = Field(None, gt=0, le=1)
    layers: list[int] | None = None
    select: Literal["regular", "importance"] = "regular"
    heal: Literal["none", "bridge", "distill"] | None = None
    distill_epochs: int = Field(2, ge=1)
    distill_lr: float = Field(1e-4, gt=0)
    sibling: str | None = None

    @model_validator(mode="after")
    def _one_method(self) -> Aux:
        if self.sibling is not None:
            if self.keep is not None or self.layers is not None:
                raise ValueError("sibling: a sibling aux is used as it is: drop keep and layers")
            if self.heal not in (None, "none"):
                raise ValueError("heal: healing applies to a layer-pruned aux, not to a sibling (set heal: none)")
            if self.select != "regular":
                raise ValueError("select applies to a layer-pruned aux, not to a sibling")
        if self.layers is not None:
            if self.keep is not None:
                raise ValueError("layers: give either keep or layers, not both")
            if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct indices >= 0, got {self.layers}")
            if self.select != "regular":
                raise ValueError("select chooses layers for keep; with an explicit layers list drop it")
        return self


class Fit(Strict):
    """The closed-form (ridge) predictor fit."""

    input: Literal["hidden", "kv"] = "hidden"
    sink: int = Field(1, ge=0)
    sources: Literal["two-sided", "paper", "window"] = "two-sided"


class Train(Strict):
    """End-to-end training of aux + predictor from the fitted predictor (kvp train's options)."""

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    batch: int = Field(8, ge=1)
    accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-4, gt=0)
    predictor_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    clip: float = Field(1.0, ge=0)
    lambda_c: float | None = Field(None, ge=0)
    z_loss: float = Field(0.0, ge=0)
    kl: float | None = Field(None, ge=0)
    mix: str = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int | None = Field(None, ge=0)  # None: about ten held-out evaluations a run; 0: off
    eval_tokens: int = Field(16_384, ge=1)
    patience: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _budget(self) -> Train:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("tokens: give either steps or tokens, not both")
        if self.patience is not None and self.eval_every == 0:
            raise ValueError("patience: early stopping reads the held-out evaluations; eval_every is 0 (off)")
        return self


class Predictor(Strict):
    """How the predictor is made: `fit` (ridge, minutes on a CPU) or `train` (fit, then end to end)."""

    method: Literal["fit", "train"] = "fit"


class Onnx(Strict):
    enabled: bool = True
    variants: list[Literal["fp32", "int8", "int4"]] = Field(default_factory=lambda: list(ONNX_VARIANTS))
    block_size: int = Field(32, ge=16)
    accuracy_level: int = Field(4, ge=0, le=4)
    int8_method: Literal["dynamic", "weight-only"] = "dynamic"
    int4_method: Literal["hqq", "rtn"] = "hqq"
    eval_n: int = Field(64, ge=1)
    prompt_len: int = Field(192, ge=4)
    cont_len: int = Field(64, ge=1)

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"int4 block size must be a power of two >= 16, got {v}")
        return v


class Coreml(Strict):
    enabled: bool = False
    targets: list[Literal["ios18", "ios17"]] = Field(default_factory=lambda: ["ios18"])
    compress: list[Literal["fp16", "int8", "int4", "palettize4"]] = Field(default_factory=lambda: ["fp16"])
    context: int = Field(1024, ge=8)
    prompt_lengths: list[int] = Field(default_factory=lambda: [64, 128, 256, 512])
    block_size: int = Field(32, ge=1)
    group_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _ios(self) -> Coreml:
        if not self.targets:
            raise ValueError("no Core ML target given (ios18, ios17)")
        for c in self.compress:
            if c in COREML_NEEDS_IOS18 and "ios17" in self.targets:
                raise ValueError(f"compress: {c} ({COREML_NEEDS_IOS18[c]}) needs iOS 18, and targets has ios17: "
                                 "drop it or use targets: [ios18]")
        if self.prompt_lengths and max(self.prompt_lengths) >= self.context:
            raise ValueError(f"prompt_lengths: {max(self.prompt_lengths)} leaves no room to generate in a "
                             f"context of {self.context}")
        return self


class Export(Strict):
    onnx: Onnx = Field(default_factory=Onnx)
    coreml: Coreml = Field(default_factory=Coreml)


Threshold = float | dict[str, float]  # one value for every variant, or per variant


class Gates(Strict):
    """Acceptance gates. The named ones expand to validator gates over every variant (or the
    variants a per-variant dict names); `extra` takes raw `KEY OP VALUE` gates."""

    parity: bool = True  # parity.<variant>.ok == 1 for every ONNX variant; Core ML checks ok
    max_delta_nll: Threshold | None = None  # KVP NLL - base NLL (through the runtime), per variant
    min_first_token_agreement: Threshold | None = None  # KVP's first token = the base's
    min_speedup: Threshold | None = None  # measured KVP TTFT speedup over base prefill
    speedup_at: list[str] | None = None  # TTFT points (BxN) the speedup gate reads (default: every point)
    max_delta_nll_vs_fp32: Threshold | None = None  # a quantized variant's KVP NLL - fp32's KVP NLL
    max_auto_vs_base: Threshold | None = None  # the default mode's worst TTFT / the base's (batch 1, 5..1024)
    max_coldstart_vs_base: Threshold | None = None  # the default mode's cold start / the base's, each length
    extra: list[str] = Field(default_factory=list)

    @field_validator("extra")
    @classmethod
    def _parse(cls, v: list[str]) -> list[str]:
        from kvp_validate.gates import Gate

        for g in v:
            try:
                Gate.parse(g)
            except KvpError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("speedup_at")
    @classmethod
    def _points(cls, v: list[str] | None) -> list[str] | None:
        for p in v or []:
            b, _, n = p.partition("x")
            if not (b.isdigit() and n.isdigit()):
                raise ValueError(f"TTFT point '{p}' is not BATCHxLENGTH like 1x512")
        return v


class Validate(Strict):
    enabled: bool = True
    checks: list[Literal["parity", "quality", "ttft", "coldstart", "humaneval"]] = Field(
        default_factory=lambda: ["parity", "quality", "ttft", "coldstart"])
    threads: int = Field(2, ge=1)
    quality_n: int | None = Field(None, ge=1)
    greedy_tokens: int = Field(16, ge=1)
    lengths: list[int] = Field(default_factory=lambda: [128, 512, 1024])
    batches: list[int] = Field(default_factory=lambda: [1])
    warmup: int = Field(1, ge=0)
    repeats: int = Field(5, ge=1)
    humaneval_limit: int | None = Field(None, ge=1)
    coldstart_lengths: list[int] = Field(default_factory=lambda: [128, 512])  # a fresh process per point
    coldstart_runs: int = Field(1, ge=1)  # fresh processes per point (median)
    tolerances: dict[str, dict[str, float]] = Field(default_factory=dict)  # parity: {int8: {kl_vs_fp32: 0.15}}
    gates: Gates = Field(default_factory=Gates)

    @field_validator("lengths", "batches", "coldstart_lengths")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError(f"expected a non-empty list of positive integers, got {v}")
        return v


class Recipe(Strict):
    """The whole run. `base` is required: a zoo name, a GGUF file or a Hugging Face folder."""

    name: str | None = None
    description: str | None = None
    base: str
    seed: int = 0
    data: Data = Field(default_factory=Data)
    aux: Aux = Field(default_factory=Aux)
    predictor: Predictor = Field(default_factory=Predictor)
    fit: Fit = Field(default_factory=Fit)
    train: Train = Field(default_factory=Train)
    export: Export = Field(default_factory=Export)
    validate_: Validate = Field(default_factory=Validate, alias="validate")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("base is empty (a zoo name, a GGUF file or a Hugging Face folder)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        v, onnx = self.validate_, self.export.onnx
        if v.enabled and not (onnx.enabled or self.export.coreml.enabled):
            raise ValueError("validate.enabled: validate is enabled but no export is (enable export.onnx or export.coreml, "
                             "or set validate.enabled: false)")
        g = v.gates
        named = {"max_delta_nll": "quality", "min_first_token_agreement": "quality", "min_speedup": "ttft",
                 "max_delta_nll_vs_fp32": "quality", "max_auto_vs_base": "ttft",
                 "max_coldstart_vs_base": "coldstart"}
        for gate, check in named.items():
            if getattr(g, gate) is not None:
                if not onnx.enabled:
                    raise ValueError(f"validate.gates.{gate}: reads the ONNX validation: enable export.onnx")
                if check not in v.checks:
                    raise ValueError(f"validate.gates.{gate}: needs the '{check}' check in validate.checks")
                per = getattr(g, gate)
                if isinstance(per, dict):
                    bad = [k for k in per if k not in onnx.variants and k != "fp32"]
                    if bad:
                        raise ValueError(f"validate.gates.{gate}: names variant '{bad[0]}', not in export.onnx.variants")
        for p in g.speedup_at or []:
            b, n = (int(x) for x in p.split("x"))
            if b not in v.batches or n not in v.lengths:
                raise ValueError(f"validate.gates.speedup_at: point {p} is not measured (validate.batches x validate.lengths)")
        if onnx.enabled and "ttft" in v.checks and min(v.lengths) < self.fit.sink + 3:
            raise ValueError(f"validate.lengths: TTFT length {min(v.lengths)} is too short for KVP with a {self.fit.sink}-token sink "
                             f"(at least {self.fit.sink + 3})")
        if self.predictor.method == "fit" and "train" in self.model_fields_set:
            raise ValueError("predictor.method: a train section is given but predictor.method is 'fit' (set it to 'train')")
        return self

    # ------------------------------------------------------------------ derived views

    @property
    def validate(self) -> Validate:  # noqa: D401 - `validate` shadows BaseModel's deprecated classmethod
        return self.validate_

    def onnx_variants(self) -> list[str]:
        return list(dict.fromkeys(["fp32", *self.export.onnx.variants]))

    def onnx_gates(self) -> list[str]:
        """The recipe's gates as validator gate strings (KEY OP VALUE)."""
        g, out = self.validate_.gates, []
        variants = self.onnx_variants()
        checks = self.validate_.checks
        if g.parity and "parity" in checks:
            out.append("parity.*.ok==1")

        def expand(thr, key: str, op: str) -> None:
            if thr is None:
                return
            for var in variants:
                val = thr.get(var) if isinstance(thr, dict) else thr
                if val is not None:
                    out.append(key.format(v=var) + f"{op}{val:g}")

        expand(g.max_delta_nll, "quality.{v}.kvp.delta_nll", "<=")
        expand(g.min_first_token_agreement, "quality.{v}.kvp.first_token_agreement", ">=")
        points = g.speedup_at or [f"{b}x{n}" for b in self.validate_.batches for n in self.validate_.lengths]
        for p in points:
            expand(g.min_speedup, "ttft.{v}." + p + ".kvp_speedup", ">=")
        if g.max_delta_nll_vs_fp32 is not None:  # quantized variants only: fp32 is the reference
            thr = g.max_delta_nll_vs_fp32
            for var in variants[1:]:
                val = thr.get(var) if isinstance(thr, dict) else thr
                if val is not None:
                    out.append(f"quality.{var}.kvp.delta_nll_vs_fp32<={val:g}")
        expand(g.max_auto_vs_base, "ttft.{v}.auto.worst_vs_base", "<=")
        for n in self.validate_.coldstart_lengths:
            expand(g.max_coldstart_vs_base, "coldstart.{v}." + f"1x{n}" + ".auto_vs_base", "<=")
        return out + list(g.extra)

    def dump(self) -> dict:
        """The recipe with defaults filled in; loads back to the same recipe (no train section under fit)."""
        exclude = {"train"} if self.predictor.method == "fit" else set()
        return self.model_dump(mode="json", by_alias=True, exclude=exclude)

    def label(self, path: str | Path | None = None) -> str:
        if self.name:
            return self.name
        if path is not None:
            p = Path(path)
            return f"{p.parent.name}-{p.stem}" if p.parent.name not in ("", ".", "recipes") else p.stem
        return "run"


# --------------------------------------------------------------------------- loading


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of every mapping key and sequence item."""


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = path + (k.value,)
            out[key] = k.start_mark.line + 1
            _lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, path + (i,), out)
    return out


def no_aliases(text: str, where: str) -> None:
    """Refuse YAML aliases (`*name`) before anything is built: nested aliases expand exponentially
    (a "billion laughs" recipe of 20 lines took 23 GB before it was refused); recipes need none."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise KvpError(f"invalid recipe: {where}:{event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                           "are not allowed in recipes")


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`a.b=value` -> (("a", "b"), value parsed as a YAML scalar or flow collection)."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key or any(not part for part in key.split(".")):
        raise KvpError(f"invalid override '{text}' (expected KEY=VALUE, e.g. --set fit.sink=2)")
    try:
        no_aliases(raw, f"--set {text}")
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise KvpError(f"invalid override '{text}': value is not YAML ({str(e).splitlines()[0]})") from None
    return tuple(key.split(".")), value


def apply_override(tree: dict, path: tuple[str, ...], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KvpError(f"--set {text}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _loc(loc: tuple) -> tuple:
    return tuple("validate" if p == "validate_" else p for p in loc)


def _format(e: ValidationError, where: str, lines: dict[tuple, int], overrides: dict[tuple, str]) -> str:
    parts = []
    for err in e.errors():
        loc = _loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and err["type"] == "value_error" and re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*", head):
            loc, msg = loc + tuple(head.split(".")), rest  # a cross-field check names its field
        field = ".".join(str(p) for p in loc) or "(recipe)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error") and \
                not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        origin = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in overrides:
                origin = f"--set {overrides[loc[:n]]}"
                break
            if loc[:n] in lines and (n > 0 or not loc):
                origin = f"{where}:{lines[loc[:n]]}"
                break
        origin = origin or where
        parts.append(f"{origin}: {field}: {msg}")
    return "invalid recipe: " + "; ".join(parts)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; a KvpError with one line naming file:line and field."""
    path = Path(path)
    if not path.is_file():
        raise KvpError(f"no such recipe file: {path}")
    text = path.read_text()
    try:
        no_aliases(text, str(path))
        node = yaml.compose(text, Loader=_LineLoader)
        tree = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KvpError(f"invalid recipe: {path}{line}: not valid YAML ({problem})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise KvpError(f"invalid recipe: {path}:1: a recipe is a mapping of sections (base, aux, fit, ...)")
    lines = _lines(node) if node is not None else {}
    origins: dict[tuple, str] = {}
    for o in overrides:
        key, value = parse_override(o)
        apply_override(tree, key, value, o)
        origins[key] = o
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise KvpError(_format(e, str(path), lines, origins)) from None
    check_tree(recipe.dump(), str(path))  # absurd numbers (limits.py), before any work
    return recipe


def section_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts (a stage's recipe section and its inputs)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
