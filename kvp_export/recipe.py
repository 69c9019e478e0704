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
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from kvp_validate import metrics as M
from kvp_validate import options as VO
from kvp_validate.metrics import metric_key
from kvp_validate.protocol import min_kvp_len

from .config import CoremlConfig, DataConfig, DeriveConfig, FitConfig, OnnxConfig, Seed, TrainConfig, rule_text
from .errors import KvpError
from .limits import check_tree


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Predictor(Strict):
    """How the predictor is made: `fit` (ridge, minutes on a CPU) or `train` (fit, then end to end)."""

    method: Literal["fit", "train"] = "fit"


class Export(Strict):
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    coreml: CoremlConfig = Field(default_factory=CoremlConfig)


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


Check = Literal["parity", "quality", "ttft", "coldstart", "humaneval", "genai"]
assert set(get_args(Check)) == set(VO.CHECKS)  # the validator's checks, as a type


class _Checks(Strict):
    enabled: bool = True
    checks: list[Check] = Field(default_factory=lambda: list(VO.DEFAULT_CHECKS))


def _measurement_field(o: VO.Option) -> tuple[Any, Any]:
    """A validator option (kvp_validate/options.py) as a recipe field: its default, bound and help."""
    if o.kind is tuple:
        return list[int], Field(default_factory=lambda: list(o.default), description=o.help)
    return (int if o.default is not None else int | None), Field(o.default, ge=o.minimum, description=o.help)


def _items_at_least(cls, v: list[int], info) -> list[int]:
    why = VO.problem(info.field_name, v)
    if why is not None:
        raise ValueError(why)
    return v


_Measurements = create_model(
    "_Measurements", __base__=_Checks,
    __validators__={"_lists": field_validator(*(o.name for o in VO.OPTIONS if o.kind is tuple))(_items_at_least)},
    **{o.name: _measurement_field(o) for o in VO.OPTIONS})


class Validate(_Measurements):
    """The validation of the exports: the validator's options (kvp_validate/options.py, the same
    names, defaults and bounds as kvp-validate's), the parity tolerances and the gates."""

    tolerances: dict[str, dict[str, float]] = Field(default_factory=dict)  # parity: {int8: {kl_vs_fp32: 0.15}}
    gates: Gates = Field(default_factory=Gates)


class RunConfig(Strict):
    """The whole run, as a recipe file describes it: the stage configs (config.py) composed. `base` is required: a zoo name, a
    GGUF file or a Hugging Face folder."""

    name: str | None = None
    description: str | None = None
    base: str
    seed: int = Seed.model_fields["seed"]
    data: DataConfig = Field(default_factory=DataConfig)
    aux: DeriveConfig = Field(default_factory=DeriveConfig)
    predictor: Predictor = Field(default_factory=Predictor)
    fit: FitConfig = Field(default_factory=FitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
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
    def _cross(self) -> RunConfig:
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
        if onnx.enabled and "ttft" in v.checks and min(v.lengths) < min_kvp_len(self.fit.sink, onnx.tail):
            raise ValueError(f"validate.lengths: TTFT length {min(v.lengths)} is too short for KVP with a {self.fit.sink}-token sink "
                             f"and a tail of {onnx.tail} (at least {min_kvp_len(self.fit.sink, onnx.tail)})")
        if self.predictor.method == "fit" and "train" in self.model_fields_set:
            raise ValueError("predictor.method: a train section is given but predictor.method is 'fit' (set it to 'train')")
        return self

    # ------------------------------------------------------------------ derived views

    @property
    def validate(self) -> Validate:  # noqa: D401 - `validate` shadows BaseModel's deprecated classmethod
        return self.validate_

    def onnx_variants(self) -> list[str]:
        return self.export.onnx.all_variants()

    def onnx_gates(self) -> list[str]:
        """The recipe's gates as validator gate strings (KEY OP VALUE)."""
        g, out = self.validate_.gates, []
        variants = self.onnx_variants()
        checks = self.validate_.checks
        if g.parity and "parity" in checks:
            out.append(metric_key("parity", "*", M.OK) + "==1")

        def expand(thr, op: str, *where: str, only: list[str] = variants) -> None:
            if thr is None:
                return
            for var in only:
                val = thr.get(var) if isinstance(thr, dict) else thr
                if val is not None:
                    out.append(metric_key(where[0], var, *where[1:]) + f"{op}{val:g}")

        expand(g.max_delta_nll, "<=", "quality", "kvp", M.DELTA_NLL)
        expand(g.min_first_token_agreement, ">=", "quality", "kvp", M.FIRST_TOKEN_AGREEMENT)
        points = g.speedup_at or [M.point(b, n) for b in self.validate_.batches for n in self.validate_.lengths]
        for p in points:
            expand(g.min_speedup, ">=", "ttft", p, M.KVP_SPEEDUP)
        # quantized variants only: fp32 is the reference
        expand(g.max_delta_nll_vs_fp32, "<=", "quality", "kvp", M.DELTA_NLL_VS_FP32, only=variants[1:])
        expand(g.max_auto_vs_base, "<=", "ttft", M.AUTO, M.WORST_VS_BASE)
        for n in self.validate_.coldstart_lengths:
            expand(g.max_coldstart_vs_base, "<=", "coldstart", M.point(1, n), M.vs_base(M.AUTO))
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
        msg = rule_text(err["msg"].removeprefix("Value error, "), cli=False)
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


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
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
        recipe = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise KvpError(_format(e, str(path), lines, origins)) from None
    check_tree(recipe.dump(), str(path))  # absurd numbers (limits.py), before any work
    return recipe


def section_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts (a stage's recipe section and its inputs)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
