"""The HumanEval harness: problems, truncation, the sandbox's verdicts and containment, pass@k.

No model: canonical solutions, wrong ones and hostile programs. About 10 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import lingering, proc_uid

from kvp_validate import sandbox
from kvp_validate.errors import ValidationError
from kvp_validate.humaneval import (
    STOP_STRINGS,
    check,
    check_all,
    evaluate_completions,
    load_problems,
    pass_at_k,
    run_humaneval,
    truncate,
)
from kvp_validate.sandbox import run_sandboxed

# Rebuilds the posix module, whose fresh copy has the real fork: the guard is bypassed, and
# only the OS layers are left to contain what follows.
BYPASS = ("import _imp, importlib.machinery, time\n"
          "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None, origin='built-in'))\n")


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in load_problems()}


@pytest.fixture
def sandbox_root(tmp_path, monkeypatch):
    """Sandbox folders go under a fresh tmp_path, so that a test can see what is left there."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def processes_in(folder, wait_s: float = 2.0) -> list[int]:
    """Sandboxed processes: those whose working directory is in `folder` (the unsafe path runs
    there) or, as root, that run as the sandbox's uid (bwrap), after waiting up to wait_s for
    them to go: killed processes vanish from /proc asynchronously."""
    return lingering(lambda pid: os.readlink(f"/proc/{pid}/cwd").startswith(str(folder))
                     or (os.geteuid() == 0 and proc_uid(pid) == sandbox.SANDBOX_UID), wait_s)


def test_load_problems_selects_and_rejects(problems):
    assert len(problems) == 164
    assert [p.task_id for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [p.task_id for p in load_problems(ids=["HumanEval/7", "3"])] == ["HumanEval/3", "HumanEval/7"]
    for bad in ({"limit": 0}, {"limit": 165}, {"limit": 2.5}, {"ids": ["HumanEval/999"]}, {"ids": []},
                {"ids": ["1", "HumanEval/1"]}, {"ids": ["0", "1"], "limit": 3}):
        with pytest.raises(ValidationError, match="HumanEval"):
            load_problems(**bad)


def test_truncate_cuts_at_the_first_top_level_line():
    body = "    x = 1\n\n    if x:\n        return x"
    for stop in STOP_STRINGS:
        assert truncate(body + stop + "rest\n    more\n") == body
    assert truncate(body + "\n\nfoo()\n") == body + "\n"
    assert truncate(body + "\n") == body + "\n"
    assert truncate("    return 1") == "    return 1"
    assert truncate("return 1\nprint(2)") == "return 1"  # the first line is always kept


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    chosen = [problems[t] for t in ("HumanEval/0", "HumanEval/32", "HumanEval/162")]  # 162 uses hashlib
    results = check_all(chosen, [p.canonical_solution for p in chosen], progress=False)
    assert [r.status for r in results] == ["passed"] * 3, results
    wrong = check(problems["HumanEval/0"], "    return None\n")
    assert (wrong.passed, wrong.status) == (False, "failed") and "AssertionError" in wrong.detail
    broken = check(problems["HumanEval/0"], "    return (\n")
    assert broken.status == "failed" and "SyntaxError" in broken.detail
    early = check(problems["HumanEval/0"], "    return True\nimport sys; sys.exit(0)\n")
    assert early.status == "failed" and "exited before its checks" in early.detail


@pytest.mark.parametrize("program, what", [
    ("import os\nwhile True:\n    os.fork()\n", "os.fork"),
    ("import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen"),
    ("import os\nos.system('true')\n", "os.system"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", "socket.socket"),
    ("import os\ntry:\n    os.kill(1, 9)\nexcept BaseException:\n    pass\n", "os.kill"),  # caught: still counts
    ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", "resource.setrlimit"),
    ("import ctypes\n", "import ctypes"),
])
def test_sandbox_refuses(program, what):
    result = run_sandboxed(program, timeout_s=5)
    assert (result.passed, result.status) == (False, "forbidden"), result
    assert what in result.detail


def test_sandbox_stops_loops_and_allocations(sandbox_root):
    start = time.monotonic()
    looping = run_sandboxed("while True:\n    pass\n", timeout_s=1)
    assert looping.status == "timeout" and time.monotonic() - start < 5
    hungry = run_sandboxed("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", memory_mb=256)
    assert hungry.status == "memory", hungry
    assert processes_in(sandbox_root) == [] and os.listdir(sandbox_root) == []
    assert socket.socket(socket.AF_INET).close() is None  # this process keeps its own functions
    assert "guard" in looping.layers and "session-kill" in looping.layers


@pytest.fixture(params=["os-sandbox", "unsafe"])
def either_path(request, monkeypatch):
    """Both execution paths: bwrap's (skipped where the host has none) and the opt-in unsafe one."""
    if request.param == "unsafe":
        monkeypatch.setattr(sandbox, "_bwrap", lambda: "forced off by the test")
    elif sandbox.os_sandbox_error():
        pytest.skip(sandbox.os_sandbox_error())
    return request.param


def test_sandbox_kills_forks_that_got_past_the_guard(sandbox_root, either_path):
    # Under bwrap the unprivileged uid's RLIMIT_NPROC makes the fork fail ("failed"); on the
    # unsafe path forked children stay in the session and killing its process group takes them.
    result = run_sandboxed(BYPASS + "for _ in range(2):\n    posix.fork()\ntime.sleep(60)\n", timeout_s=1,
                           allow_unsafe=True)
    assert result.status in ("timeout", "failed") and not result.passed
    assert processes_in(sandbox_root) == []


@pytest.mark.skipif("pidns" not in sandbox.layers(allow_unsafe=True), reason="no PID namespace on this host")
def test_pid_namespace_kills_forks_that_left_the_session(sandbox_root, either_path):
    program = BYPASS + "if posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\ntime.sleep(60)\n"
    assert run_sandboxed(program, timeout_s=1, allow_unsafe=True).status in ("timeout", "failed")
    assert processes_in(sandbox_root) == []


@pytest.mark.skipif("netns" not in sandbox.layers(allow_unsafe=True), reason="no network namespace on this host")
def test_network_namespace_has_no_route(sandbox_root):
    # Past the guard: the original _socket.socket is the last base of the guard's class.
    program = ("import socket\nreal = socket.socket.__mro__[-2]\ns = real(socket.AF_INET, socket.SOCK_STREAM)\n"
               "s.settimeout(2)\ns.connect(('127.0.0.1', 9))\n")
    result = run_sandboxed(program, timeout_s=5)
    # seccomp refuses the socket itself; without it the namespace has no route
    assert result.status == "failed" and ("unreachable" in result.detail or "not permitted" in result.detail), result


def test_writes_stay_in_the_sandbox_folder(sandbox_root):
    inside = ("import os, shutil, tempfile\nopen('out.txt', 'w').write('x')\nos.makedirs('a/b')\nshutil.rmtree('a')\n"
              "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'f'), 'w').write('x')\n")
    assert run_sandboxed(inside).status == "passed"
    victim = sandbox_root / "victim.txt"
    victim.write_text("keep")
    for program in (f"open({str(sandbox_root / 'new.txt')!r}, 'w')\n", "open('../new.txt', 'a')\n",
                    f"import os\nos.mkdir({str(sandbox_root / 'd')!r})\n", f"import os\nos.remove({str(victim)!r})\n",
                    f"import os\nos.rename({str(victim)!r}, 'stolen')\n"):
        result = run_sandboxed(program)
        assert result.status == "forbidden" and "outside the sandbox folder" in result.detail, (program, result)
    assert os.listdir(sandbox_root) == ["victim.txt"] and victim.read_text() == "keep"


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer failures than k
    assert 0.0 < pass_at_k(10**6, 1, 1) < 1e-5
    for bad in ((3, 4, 1), (3, 1, 4), (3, 1, 0)):
        with pytest.raises(ValidationError):
            pass_at_k(*bad)


def test_evaluate_completions_report(problems):
    chosen = [problems["HumanEval/0"], problems["HumanEval/2"]]
    completions = {p.task_id: [p.canonical_solution, "    return None\n"] for p in chosen}
    report = evaluate_completions(chosen, completions, ks=(1, 2), progress=False)
    json.dumps(report)
    assert report["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert report["status_counts"]["passed"] == 2 and report["status_counts"]["failed"] == 2
    assert (report["n_problems"], report["n_completions"], report["problems_passed"]) == (2, 4, 2)
    assert report["problems"]["HumanEval/2"]["passed"] == 1
    assert [r["status"] for r in report["problems"]["HumanEval/2"]["results"]] == ["passed", "failed"]
    with pytest.raises(ValidationError):
        evaluate_completions(chosen, completions, ks=(3,))
    with pytest.raises(ValidationError):
        evaluate_completions(chosen[:1], completions)


def test_run_humaneval_truncates_and_scores(problems):
    def generate(prompts, n):
        solutions = {p.prompt: p.canonical_solution for p in problems.values()}
        return [[solutions[p] + "\n\ndef junk(:\n"] * n for p in prompts]  # junk after the body is cut
    report = run_humaneval(generate, limit=2, samples=2, ks=(1, 2), progress=False)
    assert report["pass_at_k"] == {"pass@1": 1.0, "pass@2": 1.0}
    assert report["raw_completions"]["HumanEval/1"][0].endswith("def junk(:\n")
    assert set(report["seconds"]) == {"generate", "check"}
    with pytest.raises(ValidationError, match="generate must return"):
        run_humaneval(lambda prompts, n: [["x"]], limit=2, progress=False)
    with pytest.raises(ValidationError):
        run_humaneval(generate, limit=2, samples=1, ks=(2,))


def test_imports_without_torch():
    code = "import sys, kvp_validate.humaneval; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
