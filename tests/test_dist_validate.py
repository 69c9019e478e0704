"""kvp-validate as its own distribution (packaging/kvp-validate): installed alone in a fresh venv,
it validates an export made earlier in the run, and torch is not importable there.

Marked `venv`: it creates a virtual environment and pip-installs into it (PyPI or the pip cache,
about a minute); deselect with -m 'not venv' where neither is reachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "packaging" / "kvp-validate"

pytestmark = pytest.mark.venv


def bin_dir(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


@pytest.fixture(scope="module")
def validate_env(tmp_path_factory) -> Path:
    """A fresh venv with only `pip install packaging/kvp-validate` (and its dependencies)."""
    env = tmp_path_factory.mktemp("venv") / "kvp-validate"
    venv.EnvBuilder(with_pip=True).create(env)
    r = subprocess.run([str(bin_dir(env) / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        str(DIST)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return env


def run(env: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # cwd: not the repository, whose kvp_export/ folder `python -c` would import from
    return subprocess.run([str(bin_dir(env) / args[0]), *args[1:]], capture_output=True, text=True, timeout=600,
                          env={**clean, "ORT_DISABLE_TELEMETRY": "1"}, cwd=env.parent, **kw)


def test_installs_alone_without_torch_or_transformers(validate_env):
    names = {line.split("==")[0].lower() for line in run(validate_env, "python", "-m", "pip", "freeze").stdout.split()}
    assert "kvp-validate" in names
    assert not names & {"torch", "transformers", "kvp-export", "onnx", "coremltools"}, names
    r = run(validate_env, "python", "-c", "import torch")
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = run(validate_env, "python", "-c", "import kvp_validate, kvp_export")
    assert "No module named 'kvp_export'" in r.stderr
    # one version for both distributions (validate/_version.py)
    from kvp_export import __version__

    r = run(validate_env, "python", "-c", "from importlib.metadata import version; print(version('kvp-validate'))")
    assert r.stdout.strip() == __version__


def test_validates_an_export_with_parity_and_a_gate(validate_env, fp32_export, tmp_path):
    args = ["kvp-validate", str(fp32_export), "--check", "parity", "--variant", "fp32", "--threads", "1"]
    ok = run(validate_env, *args, "-o", str(tmp_path / "ok"), "--gate", "parity.fp32.ok==1",
             "--junit", str(tmp_path / "ok.xml"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["ok"] and report["results"]["parity"]["fp32"]["ok"]
    assert 'failures="0"' in (tmp_path / "ok.xml").read_text()
    bad = run(validate_env, *args, "-o", str(tmp_path / "bad"), "--gate", "parity.fp32.base_prefill.logits_rel<=0",
              "--junit", str(tmp_path / "bad.xml"))
    assert bad.returncode == 3, bad.stderr[-2000:]
    assert "gate failed: parity.fp32.base_prefill.logits_rel<=0" in bad.stderr
    assert "<failure" in (tmp_path / "bad.xml").read_text()


def test_core_ml_without_its_extra_is_a_one_line_error(validate_env, tmp_path):
    folder = tmp_path / "coreml"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"stage": "coreml"}))
    r = run(validate_env, "kvp-validate", str(folder), "-o", str(tmp_path / "rep"))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Core ML checks need coremltools"), r.stderr


def test_the_wheel_holds_the_validator_only(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(DIST)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("kvp_validate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvp_validate/cli.py" in names and "kvp_validate/_version.py" in names
    assert not any(n.startswith("kvp_export/") for n in names)
    meta = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split()[1].split("=")[0].split("<")[0].split(">")[0] for r in requires) == [
        "click", "numpy", "onnxruntime", "pydantic", "tokenizers", "tqdm"]
