"""The `kvp` CLI end to end on tiny models, its bad-input behaviour, and (integration) the
real pipeline on smollm2-135m.

Every user error must be one line on stderr (`error: ...`), exit code 1, no traceback,
and no output folder (nor a half-written one) left behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import reseal
from test_models import tiny_gguf

from kvp_export.artifacts import read_manifest
from kvp_export.cli import main
from kvp_export.derive import derive
from kvp_export.predictor.fit import fit
from kvp_export.predictor.module import KVPredictor

ROOT = Path(__file__).resolve().parents[1]


def kvp(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def user_error(result: Result, pattern: str, out: Path | None = None) -> str:
    """A one-line `error: ...` on stderr, exit 1, no traceback, and nothing written at `out`."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


@pytest.fixture
def calib(assets) -> list[str]:
    return ["--calib", str(assets["corpus"]), "--calib-tokens", "2048"]


# --------------------------------------------------------------------------- happy paths


@pytest.mark.usefixtures("isolated_cache")
def test_models_list():
    text = ok(kvp("models", "list")).stdout
    assert re.search(r"\* smollm2-135m .* 30 layers .* not cached", text)
    rows = json.loads(ok(kvp("models", "list", "--json")).stdout)
    assert {r["name"] for r in rows} == {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}
    assert re.search(r"gemma3-270m +gemma3_text +18 layers .* Gemma Terms of Use", text)


def test_models_pull_prints_the_license(monkeypatch, tmp_path):
    import kvp_export.models as models

    monkeypatch.setattr(models, "pull", lambda name, force=False: tmp_path)
    r = ok(kvp("models", "pull", "gemma3-270m"))
    assert "license Gemma Terms of Use (https://ai.google.dev/gemma/terms)" in r.stderr and str(tmp_path) in r.stdout


def test_derive_fit_generate_eval(assets, built, calib, tmp_path):
    """Determinism, and the verbs hand their options to the stages unchanged: derive and fit write
    every file the Python API wrote for conftest's `built` (same inputs and options) byte for byte
    (the manifests' `files` agree; only manifest.json differs, by `created`, times and paths).
    Then the CLI's own output (the stage functions' results: tests/test_pipeline.py)."""
    aux, pred, rep = tmp_path / "aux", tmp_path / "pred", tmp_path / "report"
    assert ok(kvp("derive", "--base", assets["llama"], "-k", "0.5", "--heal", "bridge", *calib, "-o", aux)).stdout \
        .strip() == str(aux)
    ok(kvp("fit", "--aux", aux, "--input", "hidden", "--sink", "1", *calib, "-o", pred))
    for folder, stage in ((aux, "aux"), (pred, "predictor")):
        assert read_manifest(folder, stage)["files"] == read_manifest(built[folder.name], stage)["files"], stage

    out = ok(kvp("generate", "--predictor", pred, "--max-new-tokens", "5", "--mode", "kvp", "w1 w2 w3 the fox",
                 "def ( w4 )")).stdout
    assert out.count("--- [") == 2 and re.search(r"^load \(PyTorch\): [\d.]+ ms \(models [\d.]+ ms\)$", out, re.M)
    assert re.search(r"^TTFT of the batch of 2, first call after loading: [\d.]+ ms$", out, re.M)
    assert re.search(r"^TTFT warm \(median of 3 more calls\): [\d.]+ ms$", out, re.M) and "path: kvp (mode kvp)" in out
    g = json.loads(ok(kvp("generate", "--predictor", pred, "--json", "--max-new-tokens", "3", "--temperature",
                          "0.8", "--top-k", "10", "--top-p", "0.9", "--seed", "1", "--mode", "kvp", "w1 w2")).stdout)
    assert g["kvp"] and g["prompt_tokens"] == [2] and len(g["token_ids"][0]) <= 3
    assert g["timing"]["ttft_first_call_ms"] > 0 and g["timing"]["ttft_warm_ms"] > 0
    # the default mode: KVP from the crossover on, the base below it
    for cross, want in (("2", True), ("99", False)):
        g = json.loads(ok(kvp("generate", "--predictor", pred, "--json", "--max-new-tokens", "2", "--crossover",
                              cross, "w1 w2 w3 the fox")).stdout)
        assert g["kvp"] is want and g["timing"]["mode"] == "auto" and g["timing"]["crossover"] == int(cross)

    md = ok(kvp("eval", "--predictor", pred, "--n", "4", "--prompt-len", "24", "--cont-len", "8",
                "--greedy-tokens", "4", "--heldout", assets["corpus"], "-o", rep)).stdout
    assert "| KVP |" in md and "| mean KV |" in md and (rep / "report.json").is_file()
    assert md == (rep / "report.md").read_text()


def test_derive_layer_list(assets, tmp_path):
    """--layers takes a comma list (the variants themselves: tests/test_pipeline.py)."""
    ok(kvp("derive", "--base", assets["llama"], "--layers", "0,3", "--heal", "none", "-o", tmp_path / "aux"))
    assert read_manifest(tmp_path / "aux", "aux")["kept_layers"] == [0, 3]


def test_fit_kv_input_and_sibling(assets, calib, tmp_path):
    ok(kvp("derive", "--base", assets["llama"], "--sibling", assets["sibling"], "-o", tmp_path / "aux"))
    ok(kvp("fit", "--aux", tmp_path / "aux", "--input", "kv", *calib, "-o", tmp_path / "pred"))
    assert read_manifest(tmp_path / "pred", "predictor")["layer_map"]["kind"] == "c"


def test_fit_alpha_fixes_the_ridge_strength(built, calib, tmp_path):
    """--alpha (a FitConfig field: flag, check, recipe and manifest follow from it) replaces the
    per-layer choice; a strong one shrinks the predictor and costs validation error."""
    user_error(kvp("fit", "--aux", built["aux"], "--alpha", "0", *calib, "-o", tmp_path / "bad"),
               "alpha must be > 0, got 0", tmp_path / "bad")
    ok(kvp("fit", "--aux", built["aux"], "--alpha", "1000", *calib, "-o", tmp_path / "pred"))
    got, chosen = (read_manifest(p, "predictor") for p in (tmp_path / "pred", built["pred"]))
    assert got["recipe"]["alpha"] == 1000 and "alpha" not in chosen["recipe"]
    report, best = got["fit_report"], chosen["fit_report"]
    assert set(report["alpha_k"] + report["alpha_v"]) == {1000}
    assert all(a > b for a, b in zip(report["val_rel_err_v"], best["val_rel_err_v"]))


def test_prompts_file(built, tmp_path):
    (tmp_path / "p.jsonl").write_text('"w1 w2"\n{"prompt": "the fox w3 w4 w5"}\n')
    g = json.loads(ok(kvp("generate", "--predictor", built["pred"], "--prompts-file", tmp_path / "p.jsonl",
                          "--json", "--max-new-tokens", "2", "--no-kvp")).stdout)
    assert g["prompts"] == ["w1 w2", "the fox w3 w4 w5"] and g["kvp"] is False


def test_overwrite_replaces_output(built, assets, calib, tmp_path):
    out = tmp_path / "pred"
    ok(kvp("fit", "--aux", built["aux"], *calib, "-o", out))
    user_error(kvp("fit", "--aux", built["aux"], *calib, "-o", out), "output folder exists: .*--overwrite")
    ok(kvp("fit", "--aux", built["aux"], "--sink", "2", *calib, "-o", out, "--overwrite"))
    assert read_manifest(out, "predictor")["sink_len"] == 2


def test_exactness_through_the_cli(assets, tmp_path):
    """aux = base (keep 1.0, no healing) + identity predictor: KVP generates exactly the base's tokens."""
    ok(kvp("derive", "--base", assets["llama"], "-k", "1.0", "--heal", "none", "-o", tmp_path / "aux"))
    ok(kvp("fit", "--aux", tmp_path / "aux", "--input", "kv", "--calib", assets["corpus"], "--calib-tokens", "2048",
           "-o", tmp_path / "pred"))
    KVPredictor.identity(4, 32).save(tmp_path / "pred")
    reseal(tmp_path / "pred")
    prompts = ["w1 w2 w3 def ( w4 ) : return w5 w6 w7", "the fox w9"]
    runs = [json.loads(ok(kvp("generate", "--predictor", tmp_path / "pred", "--json", "--max-new-tokens", "16",
                              *flag, *prompts)).stdout) for flag in (["--mode", "kvp"], ["--no-kvp"])]
    assert runs[0]["token_ids"] == runs[1]["token_ids"] and runs[0]["kvp"] and not runs[1]["kvp"]


def test_packaging_lists_every_subpackage():
    """pyproject lists packages by hand (validate/ installs as kvp_validate): none may be missing."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kvp_export").rglob("__init__.py")}
    assert found <= listed and "kvp_validate" in listed


@pytest.mark.parametrize("module", ["kvp_export", "kvp_export.cli"])
def test_python_dash_m_has_every_verb(module):
    """`python -m kvp_export` and `python -m kvp_export.cli` (torchrun's form) run the whole CLI,
    verbs registered late in cli.py included."""
    def help_of(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", module, *args, "--help"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert {"export", "train", "run", "validate"} <= set(re.findall(r"^  (\w+)", help_of(), re.M))
    assert {"onnx", "coreml"} <= set(re.findall(r"^  (\w+)", help_of("export"), re.M))


# --------------------------------------------------------------------------- bad input


@pytest.mark.usefixtures("isolated_cache")
class TestBadInput:
    def test_missing_paths(self, tmp_path, calib):
        out = tmp_path / "out"
        user_error(kvp("derive", "--base", tmp_path / "nope", "-o", out), "no such file or folder", out)
        user_error(kvp("derive", "--base", tmp_path / "nope.gguf", "-o", out), "no such file or folder", out)
        user_error(kvp("derive", "--calib", tmp_path / "nope", "-o", out), "no such calibration file", out)
        user_error(kvp("fit", "--aux", tmp_path / "nope", *calib, "-o", out), "no such folder", out)
        user_error(kvp("generate", "--predictor", tmp_path / "nope", "hi"), "no such folder")
        user_error(kvp("eval", "--predictor", tmp_path / "nope", "-o", out), "no such folder", out)
        user_error(kvp("generate", "--predictor", tmp_path, "--prompts-file", tmp_path / "p.txt"), "cannot read")

    @pytest.mark.parametrize("cut", ["half", "last-bytes", "header", "tampered-magic"])
    def test_truncated_or_tampered_gguf(self, tmp_path, cut):
        good = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
        bad = tmp_path / "bad.gguf"
        bad.write_bytes({"half": good[: len(good) // 2], "last-bytes": good[:-7], "header": good[:200],
                         "tampered-magic": b"GGUX" + good[4:]}[cut])
        user_error(kvp("derive", "--base", bad, "-o", tmp_path / "out"), "not a valid GGUF file", tmp_path / "out")

    def test_unsupported_architecture(self, tmp_path):
        folder = tmp_path / "gpt2"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
        user_error(kvp("derive", "--base", folder, "-o", tmp_path / "out"), "unsupported architecture 'gpt2'",
                   tmp_path / "out")
        gguf = tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
        user_error(kvp("derive", "--base", gguf, "-o", tmp_path / "out"), "unsupported architecture 'gpt2'",
                   tmp_path / "out")

    def test_tokenizer_mismatch(self, assets, tmp_path):
        out = tmp_path / "out"
        user_error(kvp("derive", "--base", assets["llama"], "--sibling", assets["foreign"], "-o", out),
                   "tokenizers differ", out)

    @pytest.mark.parametrize("keep", ["0", "1.5", "-1", "nan"])
    def test_keep_ratio_out_of_range(self, assets, tmp_path, keep):
        out = tmp_path / "out"
        user_error(kvp("derive", "--base", assets["llama"], "-k", keep, "-o", out), r"keep ratio must be in \(0, 1\]",
                   out)

    @pytest.mark.parametrize(("layers", "pattern"), [("0,4", r"\[4\] out of range.*0\.\.3"),
                                                     ("1,1", "repeats"), ("-1,2", "out of range")])
    def test_layer_list_out_of_range(self, assets, tmp_path, layers, pattern):
        out = tmp_path / "out"
        user_error(kvp("derive", "--base", assets["llama"], f"--layers={layers}", "-o", out), pattern, out)

    def test_contradictory_options(self, assets, tmp_path):
        out = tmp_path / "out"
        user_error(kvp("derive", "--base", assets["llama"], "--layers", "0,1", "-k", "0.5", "-o", out),
                   "either --layers or --keep", out)
        user_error(kvp("derive", "--base", assets["llama"], "--sibling", assets["sibling"], "--heal", "bridge",
                       "-o", out), "healing applies to a layer-pruned aux", out)

    def test_calibration_empty_or_unreadable(self, assets, tmp_path):
        out = tmp_path / "out"
        (tmp_path / "empty").mkdir()
        user_error(kvp("derive", "--base", assets["llama"], "--calib", tmp_path / "empty", "-o", out),
                   "calibration corpus is empty", out)
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
        user_error(kvp("derive", "--base", assets["llama"], "--calib", bad, "-o", out), "not UTF-8 text", out)

    def test_prompt_longer_than_context(self, assets, tmp_path):
        aux = derive(tmp_path / "aux", base=str(assets["short"]), keep=0.5, heal="none", progress=False)
        pred = fit(aux, tmp_path / "pred", calib=[str(assets["corpus"])], calib_tokens=1024, progress=False)
        assert read_manifest(pred, "predictor")["inputs"]["calibration"]["seq_len"] == 64
        long_prompt = " ".join(["w1"] * 70)
        user_error(kvp("generate", "--predictor", pred, long_prompt, "w2"),
                   r"prompt of 70 tokens \(\+\d+ to generate\) is longer than the context \(64\)")
        user_error(kvp("eval", "--predictor", pred, "--n", "2", "--prompt-len", "60", "--cont-len", "8",
                       "--heldout", assets["corpus"], "-o", tmp_path / "rep"), "longer than the context",
                   tmp_path / "rep")

    def test_existing_output_refused_before_work(self, built, assets, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        for args in (["derive", "--base", tmp_path / "nope"],  # refused before the base is even resolved
                     ["fit", "--aux", built["aux"]],
                     ["eval", "--predictor", built["pred"]]):
            user_error(kvp(*args, "-o", out), "output folder exists")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def test_bad_generation_options(self, built):
        user_error(kvp("generate", "--predictor", built["pred"]), "no prompts given")
        user_error(kvp("generate", "--predictor", built["pred"], "--top-p", "0", "x"), "top-p must be in")
        user_error(kvp("generate", "--predictor", built["pred"], "--max-new-tokens", "0", "x"), "max-new-tokens")
        user_error(kvp("generate", "--predictor", built["aux"], "x"), "'aux' artifact, expected 'predictor'")

    def test_usage_errors_exit_2(self, tmp_path):
        assert kvp("derive", "--select", "bogus", "-o", tmp_path / "o").exit_code == 2
        assert kvp("derive", "--layers", "a,b", "-o", tmp_path / "o").exit_code == 2
        assert kvp("fit", "-o", tmp_path / "o").exit_code == 2  # --aux missing
        assert not (tmp_path / "o").exists()

    def test_unknown_zoo_model(self):
        user_error(kvp("models", "pull", "llama-70b"), "unknown zoo model 'llama-70b'")


# --------------------------------------------------------------------------- real model


@pytest.mark.integration
def test_real_pipeline_smollm2(tmp_path):
    """derive keep 0.5 + bridge, fit, eval on smollm2-135m with small budgets: KVP beats the mean KV."""
    assert Path(ok(kvp("models", "pull", "smollm2-135m")).stdout.strip()).is_dir()
    aux, pred, rep = tmp_path / "aux", tmp_path / "pred", tmp_path / "report"
    ok(kvp("derive", "--base", "smollm2-135m", "-k", "0.5", "--heal", "bridge", "--calib-tokens", "4096", "-o", aux))
    ok(kvp("fit", "--aux", aux, "--calib-tokens", "4096", "-o", pred))
    ok(kvp("eval", "--predictor", pred, "--n", "4", "--greedy-tokens", "4", "-o", rep))
    paths = json.loads((rep / "report.json").read_text())["results"]["paths"]
    assert paths["kvp"]["nll"] < paths["mean_kv"]["nll"]
    assert paths["kvp"]["flops_ratio_vs_base"] > 1.5
