"""Recipes (schema, overrides), `kvp run` (cached stages, gates, JUnit), `kvp compare`, on the tiny models."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kvp_export.cli import main
from kvp_export.errors import KvpError
from kvp_export.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "ci.yaml"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(KvpError) as e:
        load_recipe(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- schema


def test_shipped_recipes_are_valid():
    names = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").glob("*/*.yaml"))
    assert names == ["gemma3-270m/keep-0.50.yaml", "qwen2.5-coder-0.5b/keep-0.50-trained.yaml",
                     "qwen2.5-coder-0.5b/keep-0.50.yaml", "qwen2.5-coder-0.5b/keep-0.75-trained.yaml",
                     "smollm2-135m/keep-0.25.yaml",
                     "smollm2-135m/keep-0.50.yaml", "smollm2-135m/keep-0.75.yaml", "tiny/ci.yaml"]
    for n in names:
        r = load_recipe(ROOT / "recipes" / n)
        assert r.onnx_gates()[0] == "parity.*.ok==1"
    r = load_recipe(ROOT / "recipes/smollm2-135m/keep-0.50.yaml")
    assert r.aux.keep == 0.5 and r.onnx_variants() == ["fp32", "int8", "int4"]
    assert "quality.int4.kvp.delta_nll<=0.9" in r.onnx_gates()
    assert "ttft.int8.1x1024.kvp_speedup>=1.15" in r.onnx_gates()
    r = load_recipe(ROOT / "recipes/qwen2.5-coder-0.5b/keep-0.75-trained.yaml")
    assert r.predictor.method == "train" and r.train.kl == 1.0
    assert r.onnx_gates() == ["parity.*.ok==1", "humaneval.int8.kvp.pass@1>=0.375"]
    r = load_recipe(ROOT / "recipes/qwen2.5-coder-0.5b/keep-0.50-trained.yaml")
    assert r.predictor.method == "train" and r.aux.keep == 0.5 and r.export.onnx.tail == 32
    assert r.onnx_gates() == ["parity.*.ok==1", "humaneval.int8.kvp.pass@1>=0.3"]


def test_unknown_key_names_line_and_field(tmp_path):
    p = write(tmp_path, "base: smollm2-135m\naux:\n  keep: 0.5\n  kep: 0.25\n")
    msg = error_of(p)
    assert f"{p}:4: aux.kep: unknown key" in msg


def test_wrong_type_names_line_field_and_value(tmp_path):
    p = write(tmp_path, "base: smollm2-135m\nfit:\n  sink: one\n")
    msg = error_of(p)
    assert f"{p}:3: fit.sink:" in msg and "'one'" in msg


def test_missing_base(tmp_path):
    msg = error_of(write(tmp_path, "aux:\n  keep: 0.5\n"))
    assert "base: required field is missing" in msg


def test_int4_coreml_for_ios17_is_refused(tmp_path):
    p = write(tmp_path, "base: smollm2-135m\nexport:\n  coreml:\n    enabled: true\n    targets: [ios17]\n"
                        "    compress: [fp16, int4]\n")
    msg = error_of(p)
    assert f"{p}:6: export.coreml.compress: int4" in msg and "iOS 18" in msg


@pytest.mark.parametrize("text,needle", [
    ("base: b\naux:\n  keep: 0.5\n  layers: [0, 2]\n", "aux.layers: give either layers or keep"),
    ("base: b\naux:\n  sibling: ./small\n  heal: bridge\n", "aux.heal: healing applies"),
    ("base: b\naux:\n  keep: 1.5\n", "aux.keep: keep ratio must be in (0, 1], got 1.5"),
    ("base: b\nexport:\n  onnx:\n    enabled: false\n", "validate.enabled: validate is enabled but no export"),
    ("base: b\nvalidate:\n  gates:\n    speedup_at: [1x64]\n", "speedup_at: point 1x64 is not measured"),
    ("base: b\nvalidate:\n  gates:\n    extra: ['speed > fast']\n", "invalid gate"),
    ("base: b\ntrain:\n  steps: 3\n", "predictor.method: a train section is given"),
    ("base: b\n  bad: indent\n", "not valid YAML"),
    ("- base\n", "a recipe is a mapping"),
])
def test_contradictions_and_bad_values(tmp_path, text, needle):
    assert needle in error_of(write(tmp_path, text))


def test_overrides_are_yaml_and_validated(tmp_path):
    p = write(tmp_path, "base: smollm2-135m\n")
    r = load_recipe(p, ["fit.sink=2", "export.onnx.variants=[fp32, int8]", "validate.gates.min_speedup=1.3",
                        "data.calib=[a, b]", "predictor.method=train", "train.steps=5"])
    assert r.fit.sink == 2 and r.onnx_variants() == ["fp32", "int8"] and r.data.calib == ["a", "b"]
    assert "ttft.int8.1x512.kvp_speedup>=1.3" in r.onnx_gates() and r.train.steps == 5
    assert "--set fit.sink=two: fit.sink:" in error_of(p, ["fit.sink=two"])
    assert "--set fit.lambda=1e-3: fit.lambda: unknown key" in error_of(p, ["fit.lambda=1e-3"])
    assert "invalid override" in error_of(p, ["fit.sink"])
    assert "--set base=: base: Input should be a valid string" in error_of(p, ["base="])


def test_cli_errors_are_one_line(tmp_path):
    p = write(tmp_path, "base: smollm2-135m\naux:\n  kep: 0.5\n")
    res = CliRunner().invoke(main, ["run", str(p)])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert res.output.startswith(f"error: invalid recipe: {p}:3: aux.kep: unknown key")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 1 and "no such recipe file" in res.output
    res = CliRunner().invoke(main, ["run", str(TINY), "--dry-run", "--set", "aux.keep=0.25"])
    assert res.exit_code == 0 and "keep: 0.25" in res.output


# ---------------------------------------------------------------- kvp run on the tiny recipe


def tiny_args(assets, run_dir: Path, *extra: str) -> list[str]:
    corpus = str(assets["corpus"])
    return ["run", str(TINY), "-o", str(run_dir), "--set", f"base={assets['llama']}",
            "--set", f"data.calib=[{corpus}]", "--set", f"data.heldout=[{corpus}]", *extra]


@pytest.fixture(scope="module")
def tiny_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    junit = run_dir.parent / "junit.xml"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, tiny_args(assets, run_dir, "--junit", str(junit)))
    return {"dir": run_dir, "result": res, "seconds": time.perf_counter() - t0, "junit": junit}


def test_tiny_recipe_end_to_end(tiny_run):
    res, run_dir = tiny_run["result"], tiny_run["dir"]
    assert res.exit_code == 0, res.output
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["derive", "fit", "onnx", "validate-onnx"]
    assert all(s["status"] == "ran" for s in run["stages"]) and run["ok"] and run["complete"]
    assert run["gates"] and all(g["ok"] for g in run["gates"])
    for s in run["stages"]:
        assert (run_dir / s["folder"]).is_dir() and s["folder"].startswith(f"stages/{s['name']}-")
    report = (run_dir / "report.md").read_text()
    assert "## Stages" in report and "## Gates" in report and "![Pareto" in report
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((run_dir / "compare.json").read_text())["rows"]
    assert [(r["format"], r["variant"]) for r in rows] == [("onnx", "fp32"), ("onnx", "int8")]
    assert rows[0]["parity"] == "ok" and set(rows[0]["ttft"]) == {"1x8", "1x12"}
    again = load_recipe(run_dir / "recipe.yaml")  # the run's recipe, defaults filled in, loads back as it is
    assert again.dump() == yaml.safe_load((run_dir / "recipe.yaml").read_text()) and again.name == "tiny-ci"
    assert tiny_run["seconds"] < 120


def test_second_run_reuses_every_stage(tiny_run, assets):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, tiny_args(assets, tiny_run["dir"]))
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    run = json.loads((tiny_run["dir"] / "run.json").read_text())
    assert all(s["status"] == "cached" for s in run["stages"])
    assert res.output.count("cached") >= 4 and seconds < 10


def test_validation_off_builds_the_stages_and_gates_nothing(tiny_run, assets, tmp_path):
    """`--set validate.enabled=false` builds (here: reuses) derive/fit/export and says no gate ran."""
    import shutil

    run_dir = tmp_path / "built"
    shutil.copytree(tiny_run["dir"], run_dir)
    res = CliRunner().invoke(main, tiny_args(assets, run_dir, "--set", "validate.enabled=false"))
    assert res.exit_code == 0, res.output
    assert [s["name"] for s in json.loads((run_dir / "run.json").read_text())["stages"]] == ["derive", "fit", "onnx"]
    assert "gates: none (validation off or no gates set)" in res.output


def test_changed_section_reruns_only_downstream(tiny_run, assets, tmp_path):
    """A changed export section reruns export + validation; a partial stage folder is redone."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run["dir"], run_dir)
    derive_dir = next((run_dir / "stages").glob("derive-*"))
    res = CliRunner().invoke(main, tiny_args(assets, run_dir, "--set", "export.onnx.variants=[fp32]"))
    assert res.exit_code == 0, res.output
    status = {s["name"]: s["status"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}
    assert status == {"derive": "cached", "fit": "cached", "onnx": "ran", "validate-onnx": "ran"}
    (derive_dir / "manifest.json").unlink()  # as if the stage had died half-way
    res = CliRunner().invoke(main, tiny_args(assets, run_dir, "--set", "export.onnx.variants=[fp32]"))
    assert res.exit_code == 0, res.output
    status = {s["name"]: s["status"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}
    assert status["derive"] == "ran" and "incomplete" in res.output


def test_train_method_end_to_end(tiny_run, assets, tmp_path):
    """predictor.method: train: derive and fit reused, train runs from the fit, and the export and
    validation read the trained predictor; a rerun reuses every stage, train included."""
    import shutil

    run_dir = tmp_path / "trained"
    shutil.copytree(tiny_run["dir"], run_dir)
    args = tiny_args(assets, run_dir, "--set", "predictor.method=train", "--set", "train.steps=2",
                     "--set", "train.seq_len=32", "--set", "train.batch=2", "--set", "train.eval_every=0",
                     "--set", "export.onnx.variants=[fp32]")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = json.loads((run_dir / "run.json").read_text())
    status = {s["name"]: s["status"] for s in run["stages"]}
    assert status == {"derive": "cached", "fit": "cached", "train": "ran", "onnx": "ran", "validate-onnx": "ran"}
    folders = {s["name"]: run_dir / s["folder"] for s in run["stages"]}
    trained = json.loads((folders["train"] / "manifest.json").read_text())
    assert trained["stage"] == "predictor" and trained["training"]["steps"] == 2
    assert trained["inputs"]["predictor"]["path"] == str(folders["fit"].resolve())
    onnx = json.loads((folders["onnx"] / "manifest.json").read_text())
    assert onnx["inputs"]["predictor"]["path"] == str(folders["train"].resolve())
    assert not list(run_dir.glob("stages/*.ckpt"))
    assert run["ok"] and run["gates"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = json.loads((run_dir / "run.json").read_text())
    assert all(s["status"] == "cached" for s in run["stages"])


@pytest.mark.parametrize("stage,rel", [("onnx", "fp32/base_decode.onnx"), ("validate-onnx", "report.json"),
                                       ("fit", "predictor.safetensors")])
def test_a_changed_cached_stage_is_refused(tiny_run, assets, tmp_path, stage, rel):
    """The stage cache checks a cached folder's files: a changed one is refused in one line naming it."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run["dir"], run_dir)
    path = next((run_dir / "stages").glob(f"{stage}-*")) / rel
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    res = CliRunner().invoke(main, tiny_args(assets, run_dir))
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: file ") and f"{stage}-" in err and err.endswith(
        "(changed after the stage wrote it)") and rel in err
    assert res.stderr.count("error:") == 1


def test_too_strict_gate_exits_3_naming_gate_and_value(tiny_run, assets, tmp_path):
    junit = tmp_path / "junit.xml"
    res = CliRunner().invoke(main, tiny_args(assets, tiny_run["dir"], "--set", "validate.gates.min_speedup=1000",
                                             "--junit", str(junit)))
    assert res.exit_code == 3, res.output
    assert "gate failed: ttft.fp32.1x8.kvp_speedup>=1000 (measured ttft.fp32.1x8.kvp_speedup = " in res.output
    run = json.loads((tiny_run["dir"] / "run.json").read_text())
    assert all(s["status"] == "cached" for s in run["stages"])  # gates are re-evaluated, nothing re-measured
    assert not run["ok"]
    report = (tiny_run["dir"] / "report.md").read_text()
    assert "ttft.fp32.1x8.kvp_speedup>=1000" in report and "FAIL" in report
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and int(root.get("failures")) == 4  # 2 variants x 2 lengths
    fails = [tc for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert "measured ttft.fp32.1x8.kvp_speedup =" in fails[0].find("failure").get("message")
    # restore the passing state for the tests that follow
    assert CliRunner().invoke(main, tiny_args(assets, tiny_run["dir"])).exit_code == 0


def test_junit_of_a_passing_run(tiny_run):
    root = ET.parse(tiny_run["junit"]).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert {"run.stages", "onnx.parity", "run.gates"} <= set(suites)
    assert root.get("failures") == "0" and int(suites["onnx.parity"].get("tests")) > 2
    assert len(suites["run.stages"].findall("testcase")) == 4


def test_validate_junit(tiny_run, tmp_path):
    onnx = next((tiny_run["dir"] / "stages").glob("onnx-*"))
    junit = tmp_path / "v.xml"
    res = CliRunner().invoke(main, ["validate", str(onnx), "-o", str(tmp_path / "rep"), "--check", "parity",
                                    "--gate", "parity.*.ok==1", "--gate", "parity.fp32.ok>1", "--junit", str(junit)])
    assert res.exit_code == 3, res.output
    root = ET.parse(junit).getroot()
    assert root.get("failures") == "1"
    msgs = [f.get("message") for f in root.iter("failure")]
    assert msgs == ["gate parity.fp32.ok>1 failed: measured parity.fp32.ok = 1"]


# ---------------------------------------------------------------- kvp compare


def test_compare_runs_and_reports(tiny_run, tmp_path):
    report = next((tiny_run["dir"] / "stages").glob("validate-onnx-*"))
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["compare", str(tiny_run["dir"]), str(report), "-o", str(out), "--metric", "nll"])
    assert res.exit_code == 0, res.output
    payload = json.loads((out / "compare.json").read_text())
    assert len(payload["rows"]) == 4 and payload["pareto"] == {"at": "1x12", "metric": "nll", "png": "pareto.png"}
    assert {r["run"] for r in payload["rows"]} == {"tiny-ci", report.name}
    md = (out / "compare.md").read_text()
    assert "| tiny-ci | onnx | int8 |" in md and "speedup 1x8" in md and "![Pareto" in md
    assert (out / "pareto.png").stat().st_size > 1000
    res = CliRunner().invoke(main, ["compare", str(tiny_run["dir"]), "-o", str(out), "--at", "4x99"])
    assert res.exit_code == 1 and "TTFT point 4x99 was not measured" in res.output


def test_compare_missing_or_wrong_folders(tiny_run, tmp_path):
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "gone"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output == f"error: no such run or report folder: {tmp_path / 'gone'}\n"
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not a run folder (no run.json)" in res.output
    onnx = next((tiny_run["dir"] / "stages").glob("onnx-*"))
    res = CliRunner().invoke(main, ["compare", str(onnx), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "without a validation report" in res.output


def test_pareto_front():
    from kvp_export.compare import pareto_front

    pts = [(10, 0.5), (5, 0.3), (7, 0.6), (12, 0.55), (20, 0.9)]
    assert pareto_front(pts, higher_better=True) == [1, 2, 4]
    assert pareto_front([(1, 3.0), (2, 2.0), (3, 2.5)], higher_better=False) == [0, 1]


def test_plot_labels_drop_what_every_point_shares():
    from kvp_export.compare import _point_names

    rows = [{"run": f"smollm2-135m-keep-{k}", "format": "onnx", "variant": v} for k in ("0.25", "0.50") for v in
            ("fp32", "int8")]
    assert [_point_names(rows)(r) for r in rows] == ["0.25 fp32", "0.25 int8", "0.50 fp32", "0.50 int8"]
    one = [{"run": "a", "format": "onnx", "variant": "fp32"}, {"run": "a", "format": "coreml", "variant": "fp16"}]
    assert [_point_names(one)(r) for r in one] == ["onnx fp32", "coreml fp16"]


def test_run_with_coreml_export(tiny_run, assets, tmp_path):
    """Core ML enabled: export + the validator's Linux checks as stages, gated, in the table and JUnit."""
    import shutil

    pytest.importorskip("coremltools")
    run_dir = tmp_path / "ml"
    shutil.copytree(tiny_run["dir"], run_dir)
    junit = tmp_path / "j.xml"
    res = CliRunner().invoke(main, tiny_args(assets, run_dir, "--set", "export.coreml.enabled=true",
                                             "--set", "export.coreml.context=64",
                                             "--set", "export.coreml.prompt_lengths=[8,16]", "--junit", str(junit)))
    assert res.exit_code == 0, res.output
    run = json.loads((run_dir / "run.json").read_text())
    status = {s["name"]: s["status"] for s in run["stages"]}
    assert status == {"derive": "cached", "fit": "cached", "onnx": "cached", "coreml": "ran",
                      "validate-onnx": "cached", "validate-coreml": "ran"}
    assert {"gate": "coreml.ok==1", "key": "coreml.ok", "value": 1.0, "ok": True} in run["gates"]
    rows = json.loads((run_dir / "compare.json").read_text())["rows"]
    assert ("coreml", "ios18-fp16") in {(r["format"], r["variant"]) for r in rows}
    root = ET.parse(junit).getroot()
    assert root.get("failures") == "0" and int(root.get("skipped")) == 1  # macOS measurements
