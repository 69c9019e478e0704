"""Child side of the sandbox: `python -I [-S] _sandbox_child.py MEMORY_MB CPU_S` in the sandbox folder.

Standard library only: under bwrap it runs from a read-only copy in the sandbox folder, with
nothing of this package (or any site-packages) in reach.

It is trusted code that runs before the untrusted program.py in the same interpreter: it sets
the resource limits (here rather than in a `preexec_fn`, see sandbox.py), installs the guard,
executes the program and reports through its exit code and a last stderr line.

The guard replaces the functions that create processes, signal other processes, open
sockets, raise limits or delete and rename files with ones that raise `SandboxViolation`, and
confines file writes to the sandbox folder. It is a tripwire that gives a clear "forbidden"
verdict, not a security boundary: Python code can always rebuild a module it was denied. The
OS layers (sandbox.py: bwrap's namespaces, the unprivileged uid, seccomp, limits) are what
hold against such code.
"""

from __future__ import annotations

import builtins
import importlib
import io
import os
import posix
import resource
import signal
import sys
import traceback

# 1 and 2 are the interpreter's own failures; the parent reads anything else as "error".
PASSED, FAILED, FORBIDDEN, MEMORY, TIMEOUT = 0, 3, 4, 5, 6
MARK = "kvp-sandbox: "  # prefix of the verdict line on stderr
NO_GUARD = "--no-guard"  # tests only: the OS layers alone

DENIED = {  # module names -> function names
    "os posix": "fork forkpty system popen posix_spawn posix_spawnp execv execve execvp execvpe "
                "execl execle execlp execlpe kill killpg setsid setpgid chroot _exit",
    "subprocess": "Popen",
    "_posixsubprocess": "fork_exec",
    "socket _socket": "socketpair fromfd",  # and the socket class: see install_guard
    "resource": "setrlimit prlimit",
}
# Allowed inside the sandbox folder only (every str/bytes/path positional argument is a path).
PATH_OPS = ("mkdir mkfifo mknod remove unlink rmdir removedirs rename renames replace truncate "
            "chmod chown lchown link symlink utime")
BLOCKED_IMPORTS = {"ctypes", "_ctypes"}  # the shortest way around everything above
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
violations: list[str] = []


class SandboxViolation(BaseException):
    """Raised by a disabled function; a BaseException so that `except Exception` won't hide it."""


class CpuLimit(BaseException):
    """RLIMIT_CPU's soft limit was reached (SIGXCPU)."""


def deny(what: str) -> SandboxViolation:
    violations.append(what)
    return SandboxViolation(f"sandbox: {what} is not allowed")


def set_limits(memory_mb: int, cpu_s: int) -> None:
    """Hard limit = soft, so the program cannot raise them (root could: the guard denies
    setrlimit); except CPU, where SIGXCPU at the soft limit gives a "timeout" verdict and
    SIGKILL at the hard one backs it up."""
    for res, soft, hard in ((resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
                            (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                            (resource.RLIMIT_FSIZE, 16 << 20, 16 << 20), (resource.RLIMIT_NOFILE, 64, 64),
                            (resource.RLIMIT_NPROC, 1, 1), (resource.RLIMIT_CORE, 0, 0)):
        limit = resource.getrlimit(res)[1]
        if limit != resource.RLIM_INFINITY:
            soft, hard = min(soft, limit), min(hard, limit)
        resource.setrlimit(res, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead

    def on_xcpu(signum, frame):
        raise CpuLimit(f"CPU time limit of {cpu_s} s reached")
    signal.signal(signal.SIGXCPU, on_xcpu)


def install_guard(root: str) -> None:
    def inside(path, dir_fd: int | None = None) -> bool:
        path = os.fsdecode(path)
        if dir_fd is not None:  # shutil.rmtree works relative to directory descriptors
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path).startswith(root + os.sep)

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise deny(what)
        return refused

    def confine(what: str, fn):
        def confined(*args, dir_fd=None, **kwargs):
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if "src_dir_fd" in kwargs or "dst_dir_fd" in kwargs or not all(inside(p, dir_fd) for p in paths):
                raise deny(f"{what} outside the sandbox folder")
            return fn(*args, **kwargs) if dir_fd is None else fn(*args, dir_fd=dir_fd, **kwargs)
        return confined

    real_open, real_os_open = io.open, posix.open

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            raise deny(f"writing {os.fsdecode(file)!r} outside the sandbox folder")
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & WRITE_FLAGS and not inside(path, dir_fd):
            raise deny(f"writing {os.fsdecode(path)!r} outside the sandbox folder")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    for modules, names in DENIED.items():
        for module in map(importlib.import_module, modules.split()):
            for name in names.split():
                if hasattr(module, name):
                    setattr(module, name, refuse(f"{module.__name__}.{name}"))
    for module in (os, posix):
        for name in PATH_OPS.split():
            if hasattr(module, name):
                setattr(module, name, confine(f"{module.__name__}.{name}", getattr(module, name)))
    for module in map(importlib.import_module, ("socket", "_socket")):
        # A subclass, not a function: ssl and others subclass socket.socket when imported.
        module.socket = type("socket", (module.socket,), {"__init__": refuse(f"{module.__name__}.socket")})
    builtins.open = io.open = open_
    os.open = posix.open = os_open

    class BlockImports:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED_IMPORTS:
                raise deny(f"import {name}")
    sys.meta_path.insert(0, BlockImports())


def run(source: str) -> tuple[int, str]:
    """Execute the program; map how it ended to an exit code and a one-line detail."""
    namespace = {"__name__": "__sandbox__"}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        code, detail = PASSED, "passed"
    except SandboxViolation as e:
        code, detail = FORBIDDEN, str(e)
    except MemoryError:
        code, detail = MEMORY, "MemoryError (memory limit reached)"
    except CpuLimit as e:
        code, detail = TIMEOUT, str(e)
    except SystemExit as e:
        code, detail = FAILED, f"the program exited before its checks ran (SystemExit: {e.code})"
    except BaseException as e:
        code, detail = FAILED, traceback.format_exception_only(e)[-1].strip()
    namespace.clear()  # frees what a runaway allocation still holds before reporting
    if violations and code != FORBIDDEN:  # a violation the program caught still counts
        code, detail = FORBIDDEN, f"sandbox: {violations[0]} is not allowed (the program caught the error)"
    return code, detail


def main() -> None:
    memory_mb, cpu_s = int(sys.argv[1]), int(sys.argv[2])
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    set_limits(memory_mb, cpu_s)
    if NO_GUARD not in sys.argv[3:]:
        install_guard(os.path.realpath(os.getcwd()))
    code, detail = run(source)
    try:
        sys.stderr.write(f"\n{MARK}{detail[:500]}\n")
        sys.stderr.flush()
    except OSError:
        pass  # stderr hit the file size limit: the exit code still tells
    sys.exit(code)


if __name__ == "__main__":
    main()
