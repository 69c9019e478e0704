"""README.md's commands and Python examples against the code.

Every `kvp` / `kvp-validate` line of the README's bash blocks is parsed by the real CLI (its
verbs, options and choices); every call of the Python example binds to the real function
(its keyword names, the stage options included); and the commands cheap on a tiny model run
for real on the shared tiny predictor and fp32 export (runs/pred and runs/onnx in the README),
with the README's paths and model names mapped onto them (the table in `test_cheap_commands_run`).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kvp_export.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def commands() -> list[list[str]]:
    """The README's kvp command lines (continuations joined, comments dropped), as argv lists."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("   #")[0].split("  #")[0].strip()
            words = shlex.split(line, comments=True) if line else []
            if "-m" in words and "kvp_export" in words:  # torchrun ... -m kvp_export VERB ...
                words = ["kvp", *words[words.index("kvp_export") + 1:]]
            if words[:1] in (["kvp"], ["kvp-validate"]):
                out.append(words)
    return out


def parse(argv: list[str]) -> click.Context:
    """Parse argv through the real command tree, as the CLI would, without running the command."""
    from kvp_validate.cli import validate_cmd

    cmd, name, args = (validate_cmd if argv[0] == "kvp-validate" else main), argv[0], list(argv[1:])
    while isinstance(cmd, click.Group):  # README lines give no group options: the verb comes first
        name, args = args[0], args[1:]
        cmd = cmd.get_command(click.Context(cmd), name)
        assert cmd is not None, f"no verb {name!r}"
    return cmd.make_context(name, args)


CMDS = commands()


def test_the_readme_has_commands():
    verbs = {c[1] for c in CMDS if c[0] == "kvp"}
    assert {"run", "derive", "fit", "train", "generate", "eval", "export", "validate", "compare"} <= verbs


@pytest.mark.parametrize("argv", CMDS, ids=[" ".join(c[:3]) for c in CMDS])
def test_every_readme_command_parses(argv):
    parse(argv)  # raises click's usage error for an unknown verb or option or a bad choice


def python_example() -> str:
    (code,) = [b for b in blocks("python") if "from kvp_export.derive import derive" in b]
    return code


def _target(node: ast.expr, names: dict):
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _target(node.value, names)
        return getattr(owner, node.attr, None) if owner is not None else None
    return None


def test_every_readme_python_call_binds():
    """The example's calls of kvp-export functions take the keywords the README gives them."""
    from kvp_export import config

    fields = {f for c in vars(config).values() if isinstance(c, type) and issubclass(c, config.Config)
              for f in c.model_fields}
    code = python_example()
    names: dict = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            mod = __import__(node.module, fromlist=[a.name for a in node.names])
            names |= {a.asname or a.name: getattr(mod, a.name) for a in node.names}
    names["pipe"] = names["KVPPipeline"]
    names["rt"] = names["OnnxKVP"]
    checked = 0
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Call):
            continue
        fn = _target(node.func, names)
        if fn is None or not callable(fn) or not getattr(fn, "__module__", "").startswith(("kvp_export", "kvp_validate")):
            continue
        sig = inspect.signature(fn)
        args = [None] * (len(node.args) + (next(iter(sig.parameters), "") == "self"))  # pipe.f(...): self
        kwargs = {k.arg: None for k in node.keywords}
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):  # a stage: **options are config fields
            bad = [k for k in kwargs if k not in sig.parameters and k not in fields]
            assert not bad, f"{ast.unparse(node)}: no option {bad[0]}"
            kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise AssertionError(f"{ast.unparse(node)}: {e}") from None
        checked += 1
    assert checked >= 12


@pytest.fixture(scope="module")
def workspace(built, fp32_export, assets, tmp_path_factory) -> dict:
    """runs/ of the README: the shared tiny predictor as runs/pred, the fp32 export as runs/onnx."""
    ws = tmp_path_factory.mktemp("readme")
    (ws / "prompts.jsonl").write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    return {"runs/pred": str(built["pred"]), "runs/aux": str(built["aux"]), "runs/onnx": str(fp32_export),
            "./my-texts": str(assets["corpus"]), "prompts.jsonl": str(ws / "prompts.jsonl"), "runs/": f"{ws}/runs/",
            "junit.xml": str(ws / "junit.xml")}


# The commands that run in seconds on the tiny model, with what the tiny model needs added: the
# README's int8 variant is the fp32 export's fp32 here (the shared export has one variant), and
# eval takes 8 pairs of 24 + 8 tokens from the tiny corpus (its default 64 of 192 + 64 need more text).
CHEAP = {
    ("kvp", "generate", "--predictor", "runs/pred", "--max-new-tokens"): (),
    ("kvp", "generate", "--predictor", "runs/pred", "--prompts-file"): (),
    ("kvp", "generate", "--predictor", "runs/pred", "--prefix"): (),
    ("kvp", "eval", "--predictor", "runs/pred", "--heldout"): ("--n", "8", "--prompt-len", "24", "--cont-len", "8"),
    ("kvp", "generate", "--onnx", "runs/onnx", "--variant", "int8", "def add(a, b):"): (),
    ("kvp", "generate", "--onnx", "runs/onnx", "--variant", "int8", "--mode"): (),
    ("kvp", "validate", "runs/onnx", "-o", "runs/ci", "--check", "parity", "--junit"): (),
    ("kvp", "run", "recipes/smollm2-135m/keep-0.50.yaml", "--dry-run"): (),
}


def _cheap(argv: list[str]) -> tuple[str, ...] | None:
    return next((extra for c, extra in CHEAP.items() if tuple(argv[:len(c)]) == c), None)


def test_cheap_commands_run(workspace, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(ROOT)
    ran = 0
    for argv in CMDS:
        extra = _cheap(argv)
        if extra is None:
            continue
        args = []
        for a in argv[1:]:
            for k, v in workspace.items():
                a = v + a[len(k):] if a.startswith(k) else a
            args.append("fp32" if a == "int8" else a)
        res = runner.invoke(main, args + list(extra))
        assert res.exit_code == 0, (argv, res.output, res.exception)
        ran += 1
    assert ran == len(CHEAP), f"{len(CHEAP) - ran} of the cheap commands are no longer in the README"
