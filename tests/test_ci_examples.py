"""examples/ci/: the GitHub Actions workflow's `run:` commands and the GitLab job's `script:` lines
run here, in order, against a small export (the export path and the kvp-validate source
substituted), pass, publish JUnit XML, and fail (exit 3) when a gate fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"
DIST = ROOT / "packaging" / "kvp-validate"

pytestmark = pytest.mark.venv


def shell(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    # GitHub's default `run:` shell is `bash --noprofile --norc -eo pipefail {0}`; GitLab runs each line in sh
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", cmd], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def base_env(yaml_env: dict, exported: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {k: str(v) for k, v in yaml_env.items()}
    return env | {"EXPORT_DIR": str(exported), "KVP_VALIDATE_SPEC": str(DIST), **extra}


def run_all(commands: list[str], cwd: Path, env: dict) -> None:
    for i, cmd in enumerate(commands):
        r = shell(cmd, cwd, env)
        assert r.returncode == 0, f"command {i + 1} failed: {cmd}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"


def check_outputs(ws: Path) -> None:
    junit = (ws / "kvp-junit.xml").read_text()
    assert "<testsuites" in junit and 'failures="0"' in junit
    assert (ws / "kvp-report" / "report.json").is_file()


def test_github_actions_workflow_runs_locally_in_order(fp32_export, tmp_path):
    wf = yaml.safe_load((CI / "github-actions.yml").read_text())
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    commands = [s["run"] for s in steps if "run" in s]
    assert len(commands) == 2 and "pip install" in commands[0] and "--junit kvp-junit.xml" in commands[1]
    # the JUnit XML is published even when the validation step fails
    publish = [s for s in steps if "uses" in s and s["uses"].startswith(("actions/upload-artifact",
                                                                       "mikepenz/action-junit-report"))]
    assert len(publish) == 2 and all(s.get("if") == "always()" for s in publish)
    ws = tmp_path / "workspace"
    ws.mkdir()
    env = base_env(job["env"], fp32_export, RUNNER_TEMP=str(tmp_path / "runner-temp"))
    run_all(commands, ws, env)
    check_outputs(ws)
    # a failing gate fails the step (exit 3) and still leaves the JUnit XML to publish
    failing = commands[1].replace("quality.fp32.kvp.nll<=6", "quality.fp32.kvp.nll<=0.001")
    assert failing != commands[1]
    r = shell(failing, ws, env)
    assert r.returncode == 3 and "gate failed: quality.fp32.kvp.nll<=0.001" in r.stderr
    assert "<failure" in (ws / "kvp-junit.xml").read_text()


def test_gitlab_job_runs_locally_in_order(fp32_export, tmp_path):
    job = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["validate-kvp-export"]
    assert job["artifacts"]["reports"]["junit"] == "kvp-junit.xml" and job["artifacts"]["when"] == "always"
    ws = tmp_path / "project"
    ws.mkdir()
    env = base_env(job["variables"], fp32_export, CI_PROJECT_DIR=str(ws))
    run_all(job["script"], ws, env)  # before_script (apt-get in the image) is the image's business
    check_outputs(ws)
