"""Stage configs (kvp_export/config.py) are the one source of every stage option: the CLI's
options and --help come from them, the recipe is made of them, rules read the same in both."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvp_export import config as C
from kvp_export.cli import main
from kvp_export.errors import KvpError

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
