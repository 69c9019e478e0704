"""Stage configs (kvp_export/config.py) are the one source of every stage option: the CLI's
options and --help come from them, the recipe is made of them, rules read the same in both."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvp_export import config as C
from kvp_export.cli import main
from kvp_export.errors import KvpError

ROOT = Path(__file__).resolve().parent.parent

VERBS = [
    (("derive",), C.DeriveConfig),
    (("fit",), C.FitConfig),
    (("train",), C.TrainConfig),
    (("eval",), C.EvalConfig),
    (("export", "onnx"), C.OnnxConfig),
    (("export", "coreml"), C.CoremlConfig),
]


def command(path: tuple[str, ...]):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize(("path", "cls"), VERBS)
def test_every_field_is_an_option_with_its_default(path, cls):
    params = {p.name: p for p in command(path).params}
    for name, field in cls.model_fields.items():
        if name == "enabled":  # a recipe switch, no option of the verb
            assert name not in params
            continue
        p = params[name]
        default = field.get_default(call_default_factory=True)
        got = p.default
        if isinstance(default, list) and default and isinstance(default[0], int):
            got = [int(x) for x in got.split(",")]
        elif isinstance(default, list):
            got = list(got)
        assert got == default, (path, name)
        assert p.help == field.description


def test_recipe_sections_are_the_stage_configs():
    from kvp_export.recipe import Export, RunConfig

    f = RunConfig.model_fields
    assert (f["aux"].annotation, f["fit"].annotation, f["train"].annotation, f["data"].annotation) == (
        C.DeriveConfig, C.FitConfig, C.TrainConfig, C.DataConfig)
    assert (Export.model_fields["onnx"].annotation, Export.model_fields["coreml"].annotation) == (
        C.OnnxConfig, C.CoremlConfig)


@pytest.mark.parametrize(("cls", "options", "message"), [
    (C.TrainConfig, {"steps": 2, "tokens": 9}, "give either --steps or --tokens, not both"),
    (C.TrainConfig, {"eval_every": 0, "patience": 1}, "--patience stops on the held-out loss"),
    (C.TrainConfig, {"lr": 0}, "lr must be > 0, got 0"),
    (C.TrainConfig, {"batch": 0}, "batch must be >= 1, got 0"),
    (C.DeriveConfig, {"keep": float("nan")}, "keep ratio must be in (0, 1], got nan"),
    (C.DeriveConfig, {"layers": [0, 1], "keep": 0.5}, "give either --layers or --keep (with --select), not both"),
    (C.CoremlConfig, {"targets": ["ios17"], "compress": ["int4"]}, "int4 (per-block int4 quantization) needs iOS 18"),
    (C.OnnxConfig, {"variants": ["fp16"]}, "unknown variant 'fp16'"),
    (C.FitConfig, {"sinks": 1}, "unknown option 'sinks'"),
])
def test_a_bad_value_is_one_line_in_the_clis_words(cls, options, message):
    with pytest.raises(KvpError) as e:
        cls.make(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_configure_splits_keywords_and_refuses_unknown_ones():
    fit, data = C.configure({"sink": 2, "calib_tokens": 64}, (C.FitConfig, None), (C.DataConfig, None))
    assert fit.sink == 2 and data.calib_tokens == 64 and fit.input == "hidden"
    given = C.FitConfig(input="kv")
    (fit,) = C.configure({"sink": 0}, (C.FitConfig, given))
    assert (fit.input, fit.sink) == ("kv", 0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sinks'"):
        C.configure({"sinks": 2}, (C.FitConfig, None))


def test_help_shows_the_configs_defaults():
    out = " ".join(CliRunner().invoke(main, ["export", "coreml", "--help"]).output.split())
    assert "--target [ios18|ios17]" in out and "[default: ios18]" in out and "[default: 64,128,256,512]" in out


def test_validator_options_are_one_table(tmp_path):
    """kvp-validate's options, validate_onnx's defaults and the recipe's validate fields: one table."""
    import inspect

    from kvp_export.recipe import Validate, load_recipe
    from kvp_validate.cli import validate_cmd
    from kvp_validate.onnx_report import validate_onnx
    from kvp_validate.options import OPTIONS

    params = {p.name: p for p in validate_cmd.params}
    signature = inspect.signature(validate_onnx).parameters
    for o in OPTIONS:
        field = Validate.model_fields[o.name]
        assert field.get_default(call_default_factory=True) == (list(o.default) if o.kind is tuple else o.default)
        assert signature[o.name].default == o.default and params[o.name].help == o.help == field.description
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: b\nvalidate:\n  batches: [0]\n")
    with pytest.raises(KvpError, match=r"r.yaml:3: validate.batches: expected a non-empty list of integers >= 1"):
        load_recipe(recipe)


# a keyword default that equals an option's by name and value, but is the neutral value of a
# lower-level function rather than the option's default: `tail` 0 is "no exact tail"
NEUTRAL = {"tail"}


def _restated_defaults(package: Path, options: dict[str, set], cli: dict[str, set]) -> list[str]:
    """Every function keyword default in `package` that writes an option's default again as a
    literal (same name, same value) instead of reading it from the config or the options table,
    and every hand-written click option that does (`cli`: options and the generate call's)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = [*zip(pos[len(pos) - len(a.defaults):], a.defaults), *zip(a.kwonlyargs, a.kw_defaults)]
            for arg, d in pairs:
                if (isinstance(d, ast.Constant) and d.value is not None and arg.arg not in NEUTRAL
                        and d.value in options.get(arg.arg, ())):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg}={d.value!r})")
        for node in ast.walk(tree):  # hand-written CLI options: click.option("--x", default=)
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "click.option" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value.lstrip("-").replace("-", "_")
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                if isinstance(default, ast.Constant) and default.value in cli.get(name, ()):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} click.option({node.args[0].value!r}, "
                                 f"default={default.value!r})")
    return found


def test_no_function_restates_an_options_default():
    """Each option's default is written once: in its stage config (kvp_export) or the validator's
    options table (kvp_validate); functions take it from there (config.default_of, DEFAULTS)."""
    from pydantic import BaseModel

    from kvp_validate.options import OPTIONS
    from kvp_validate.sampling import Sampling

    def scalar(v) -> bool:
        return isinstance(v, (int, float, str)) and not isinstance(v, bool)

    validator = {o.name: {o.default} for o in OPTIONS if scalar(o.default)}
    export = {k: set(v) for k, v in validator.items()}
    for cls in vars(C).values():
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == C.__name__:
            for name, field in cls.model_fields.items():
                if scalar(v := field.get_default(call_default_factory=True)):
                    export.setdefault(name, set()).add(v)
    cli = {**export, **{f.name: {f.default} for f in dataclasses.fields(Sampling)}}  # + `kvp generate`'s
    found = _restated_defaults(ROOT / "kvp_export", export, cli)
    assert found == [], "\n".join(found)
    found = _restated_defaults(ROOT / "validate", validator, validator)
    assert found == [], "\n".join(found)
