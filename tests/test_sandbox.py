"""The OS-level sandbox against hostile programs: a table of escape attempts.

Each attempt is a program that runs to its end ("passed") only if its escape worked, plus
what the host must still look like afterwards (no file written or changed outside, the
planted secret not leaked, the victim process and this one alive, no sandbox process left).
Every attempt runs twice: with the Python guard, and without it (`_guard=False`) so that the
OS layers alone are shown to hold; as root, and again as an unprivileged user (a numeric uid
without a passwd entry, through the system Python) when this process is root.
About 60 s on 2 cores. Needs bubblewrap; skipped (with the reason) where the host has none.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import lingering, proc_uid

from kvp_validate import sandbox
from kvp_validate.errors import KvpError
from kvp_validate.humaneval import check, load_problems
from kvp_validate.sandbox import run_sandboxed

pytestmark = pytest.mark.skipif(sandbox.os_sandbox_error() is not None,
                                reason=f"no OS sandbox here: {sandbox.os_sandbox_error()}")

SECRET = "kvp-planted-secret-8d1e"
NORMAL_UID = 61234  # the unprivileged caller of the second run (no passwd entry needed)
PRELUDE = ("import os, sys, io, time, pathlib, shutil, signal, socket, mmap, subprocess\n"
           "import importlib.machinery, _imp\n"
           # the real posix module, whatever the guard replaced
           "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None, origin='built-in'))\n"
           "def libc():\n"
           "    for f in [f for f in sys.meta_path if type(f).__name__ == 'BlockImports']:\n"
           "        sys.meta_path.remove(f)\n"
           "    import ctypes\n"
           "    return ctypes.CDLL(None, use_errno=True)\n"
           "def real_socket(*a):\n"
           "    return socket.socket.__mro__[-2](*a)\n")

# name -> (program, statuses that count as contained). {t}: the target path outside (must
# never appear), {v}: a victim file outside (must keep its bytes), {s}: the planted secret,
# {port}/{port6}: listeners of this test, {unix}/{abstract}: its unix sockets, {pid}: a
# victim process, {me}: this test's pid, {stdlib}: a file of the interpreter's stdlib.
ATTEMPTS: dict[str, str] = {
    # writes outside, through every file API
    "open() write": "open({t!r}, 'w').write('x')",
    "io.FileIO write": "io.FileIO({t!r}, 'w').write(b'x')",
    "os.open O_CREAT": "posix.write(posix.open({t!r}, os.O_WRONLY | os.O_CREAT, 0o666), b'x')",
    "pathlib write_text": "pathlib.Path({t!r}).write_text('x')",
    "shutil.copy": "open('f', 'w').write('x')\nshutil.copy('f', {t!r})",
    "os.rename out": "open('f', 'w').write('x')\nposix.rename('f', {t!r})",
    "os.link out": "open('f', 'w').write('x')\nposix.link('f', {t!r})",
    "os.symlink out": "posix.symlink('/sandbox', {t!r})",
    "truncate victim": "posix.truncate({v!r}, 0)",
    "remove victim": "posix.unlink({v!r})",
    "chmod victim": "posix.chmod({v!r}, 0o777)",
    "mmap victim": "f = open({v!r}, 'r+b')\nm = mmap.mmap(f.fileno(), 0)\nm[0:1] = b'X'\nm.flush()",
    "append to stdlib": "open({stdlib!r}, 'a').write('# x')",
    "ctypes creat": "l = libc()\nassert l.creat({t!r}.encode(), 0o666) >= 0",
    "ctypes write victim": "l = libc()\nfd = l.open({v!r}.encode(), 1)\nassert fd >= 0 and l.write(fd, b'XXXX', 4) == 4",
    # reads of secrets
    "read planted secret": "assert {secret!r} in open({s!r}).read()",
    "read /etc/shadow": "assert open('/etc/shadow').read()",
    "read project tree": "assert open({project!r}).read()",
    "read via /proc/1/root": "assert {secret!r} in open('/proc/1/root' + {s!r}).read()",
    "read host environ": "assert open('/proc/{me}/environ', 'rb').read()",
    # process creation by any route
    "subprocess": "subprocess.run(['/usr/bin/touch', {t!r}], check=True)",
    "os.fork": "pid = posix.fork()\nif pid == 0:\n    open({t!r}, 'w')\n    posix._exit(0)\nposix.waitpid(pid, 0)\n"
               "assert os.path.exists({t!r})",
    "os.posix_spawn": "pid = posix.posix_spawn('/usr/bin/touch', ['touch', {t!r}], {{}})\nposix.waitpid(pid, 0)\n"
                      "assert os.path.exists({t!r})",
    "os.system": "assert posix.system('/usr/bin/touch {t}') == 0",
    "ctypes fork": "l = libc()\npid = l.fork()\nassert pid >= 0, 'fork failed'\nif pid == 0:\n    l._exit(0)",
    "ctypes execve": "l = libc()\nimport ctypes\nargv = (ctypes.c_char_p * 3)(b'/usr/bin/touch', {t!r}.encode(), None)\n"
                     "l.execve(b'/usr/bin/touch', argv, None)\nraise OSError(ctypes.get_errno(), 'execve failed')",
    "threads bomb": "import threading\nts = [threading.Thread(target=time.sleep, args=(5,)) for _ in range(64)]\n"
                    "[t.start() for t in ts]",
    # sockets of every family
    "AF_INET to host": "s = real_socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\n"
                       "s.connect(('127.0.0.1', {port}))\ns.sendall(b'escaped')",
    "AF_INET6 to host": "s = real_socket(socket.AF_INET6, socket.SOCK_STREAM)\ns.settimeout(2)\n"
                        "s.connect(('::1', {port6}))\ns.sendall(b'escaped')",
    "AF_UNIX path": "s = real_socket(socket.AF_UNIX, socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect({unix!r})\n"
                    "s.sendall(b'escaped')",
    "AF_UNIX abstract": "s = real_socket(socket.AF_UNIX, socket.SOCK_STREAM)\ns.settimeout(2)\n"
                        "s.connect({abstract!r})\ns.sendall(b'escaped')",
    "AF_NETLINK": "s = real_socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\ns.bind((0, 0))\n"
                  "assert set(n for _, n in socket.if_nameindex()) - {{'lo'}}",
    "AF_PACKET": "s = real_socket(socket.AF_PACKET, socket.SOCK_RAW, 0)",
    "socketpair": "a, b = socket.socketpair()",
    # signals to other processes
    "kill victim": "posix.kill({pid}, 9)",
    "kill test process": "posix.kill({me}, 9)",
    # pid 1 and the parent are the sandbox's own init (as root: uid 0, so EPERM; in a user
    # namespace the same uid, and the kernel drops SIGKILL sent to an init from inside its
    # namespace): the program never counts as an escape here; the host checks do.
    "kill pid 1": "posix.kill(1, 9)\ntime.sleep(0.3)\nraise SystemExit('nothing to show')",
    "kill parent": "posix.kill(posix.getppid(), 9)\ntime.sleep(0.3)\nraise SystemExit('nothing to show')",
    "kill -1": "posix.kill(-1, 9)\ntime.sleep(0.3)\nraise SystemExit('nothing to show')",
    # resource exhaustion
    "memory": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "fork bomb": "while True:\n    posix.fork()",
    "disk fill": "n = 0\ntry:\n    for i in range(10**4):\n        open(f'fill{{i}}', 'wb').write(b'x' * (8 << 20))\n"
                 "        n += 8\nexcept OSError:\n    pass\nassert n > 1024, f'only {{n}} MB'",
    "CPU time": "while True:\n    pass",
    "setrlimit up": "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))\n"
                    "pid = posix.fork()\nif pid == 0:\n    posix._exit(0)",
    # symlink tricks, privilege
    "symlink to /etc": "posix.symlink('/etc', 'etc')\nassert open('etc/shadow').read()",
    "symlink to secret": "posix.symlink({s!r}, 'leak')\nassert {secret!r} in open('leak').read()",
    "/proc/self/root": "assert {secret!r} in open('/proc/self/root' + {s!r}).read()",
    "symlink out, write": "posix.symlink({d!r}, 'out')\nopen('out/t', 'w').write('x')\nassert os.path.exists({d!r} + '/t')",
    "setuid root": "posix.setuid(0)\nassert posix.getuid() == 0",
    "unshare userns": "l = libc()\nassert l.unshare(0x10000000) == 0, 'unshare failed'",
    "mount tmpfs": "l = libc()\nassert l.mount(b'none', b'/sandbox', b'tmpfs', 0, None) == 0, 'mount failed'",
    "ptrace": "l = libc()\nassert l.ptrace(16, 1, None, None) == 0, 'ptrace failed'",
}
SLOW = {"CPU time"}  # run with a 2 s limit


class Host:
    """What the attempts aim at, set up on the host by the test (which owns all of it)."""

    def __init__(self, root: Path, uid: int | None):
        self.root = root
        self.dir = root / "outside"
        self.dir.mkdir()
        self.secret = self.dir / "secret.txt"
        self.secret.write_text(SECRET)
        self.secret.chmod(0o644)  # readable by anyone: only the mount namespace keeps it out
        self.victim = self.dir / "victim.txt"
        self.victim.write_text("keep")
        self.victim.chmod(0o666)
        for p in (root, self.dir):
            p.chmod(0o777)  # so that file permissions are not what stops a write
        self.target = self.dir / "target"
        self.stdlib = Path(os.__file__).resolve() if uid is None else Path("/usr/lib/python3.11/os.py")
        self.stdlib_stat = self.stdlib.stat()
        self.listeners = []
        for family, addr in ((socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0))):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind(addr)
            s.listen()
            self.listeners.append(s)
        self.unix = str(self.dir / "sock")
        self.abstract = f"\0kvp-test-{os.getpid()}-{time.monotonic_ns()}"
        for addr in (self.unix, self.abstract):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(addr)
            s.listen()
            self.listeners.append(s)
        if uid is not None:
            os.chmod(self.unix, 0o777)
        for s in self.listeners:
            s.setblocking(False)
        kw = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        self.victim_proc = subprocess.Popen(["sleep", "120"], **kw)

    def fields(self) -> dict:
        return {"t": str(self.target), "v": str(self.victim), "s": str(self.secret), "d": str(self.dir),
                "secret": SECRET, "stdlib": str(self.stdlib), "project": str(Path(sandbox.__file__).resolve()),
                "port": self.listeners[0].getsockname()[1], "port6": self.listeners[1].getsockname()[1],
                "unix": self.unix, "abstract": self.abstract, "pid": self.victim_proc.pid, "me": os.getpid()}

    def damage(self) -> list[str]:
        """Whatever on the host differs from what the sandbox may leave: empty when contained."""
        out = []
        expected = {"secret.txt", "victim.txt", "sock"}
        if set(os.listdir(self.dir)) != expected:
            out.append(f"outside folder now holds {sorted(os.listdir(self.dir))}")
        if self.victim.read_text() != "keep" or self.victim.stat().st_mode & 0o777 != 0o666:
            out.append("victim file changed")
        st = self.stdlib.stat()
        if (st.st_size, st.st_mtime_ns) != (self.stdlib_stat.st_size, self.stdlib_stat.st_mtime_ns):
            out.append("stdlib file changed")
        for s in self.listeners:
            try:
                conn, _ = s.accept()
                out.append(f"a connection reached {s.getsockname()!r}")
                conn.close()
            except (BlockingIOError, OSError):
                pass
        if self.victim_proc.poll() is not None:
            out.append("victim process died")
        return out

    def close(self):
        self.victim_proc.kill()
        self.victim_proc.wait()
        for s in self.listeners:
            s.close()


def sandbox_processes(uid: int, wait_s: float = 3.0) -> list[int]:
    """Processes of the sandbox's uid in another PID namespace than ours (sandboxed ones),
    after waiting up to wait_s for them to go."""
    ours = os.readlink("/proc/self/ns/pid")
    return lingering(lambda pid: proc_uid(pid) == uid and os.readlink(f"/proc/{pid}/ns/pid") != ours, wait_s)


def programs(host: Host) -> dict[str, str]:
    fields = host.fields()
    return {name: PRELUDE + code.format(**fields) + "\n" for name, code in ATTEMPTS.items()}


def check_table(results: dict[str, dict], host: Host, uid: int) -> None:
    escaped = {name: r for name, r in results.items() if r["status"] == "passed"}
    assert not escaped, sorted(escaped)
    assert os.path.exists("/proc/1") and host.victim_proc.poll() is None
    assert host.damage() == []
    assert sandbox_processes(uid) == []
    assert len(results) >= 25


def run_table(progs: dict[str, str], guard: bool) -> dict[str, dict]:
    out = {}
    for name, prog in progs.items():
        r = run_sandboxed(prog, timeout_s=2 if name in SLOW else 10, memory_mb=256, _guard=guard)
        out[name] = {"status": r.status, "detail": r.detail, "layers": list(r.layers)}
    return out


@pytest.fixture
def host():
    root = Path(tempfile.mkdtemp(prefix="kvp-escape-"))  # under /tmp: reachable by the normal user too
    h = Host(root, None)
    yield h
    h.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("guard", [True, False], ids=["with-guard", "os-layers-alone"])
def test_escape_table_as_this_user(host, guard):
    results = run_table(programs(host), guard)
    print(json.dumps({n: (r["status"], r["detail"][:80]) for n, r in results.items()}, indent=1))
    uid = sandbox.SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    check_table(results, host, uid)
    layers = set(next(iter(results.values()))["layers"])
    assert {"bwrap", "unprivileged-uid", "mountns", "netns", "pidns", "rlimits"} <= layers
    assert ("guard" in layers) == guard


# the same table run as the normal user, by its system Python: run_table's own source
RUNNER = ("import json, sys\nsys.path.insert(0, sys.argv[1])\n"
          "from kvp_validate.sandbox import run_sandboxed  # kvp_sandbox_runner\n\n"
          + inspect.getsource(run_table)
          + "\n\nprogs, SLOW, guard = json.load(open(sys.argv[2]))\njson.dump(run_table(progs, guard), sys.stdout)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="the normal-user run needs root to switch to that user")
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs the system Python for that user")
@pytest.mark.parametrize("guard", [True, False], ids=["with-guard", "os-layers-alone"])
def test_escape_table_as_a_normal_user(guard):
    root = Path(tempfile.mkdtemp(prefix="kvp-escape-"))
    root.chmod(0o755)
    host = Host(root, NORMAL_UID)
    try:
        shutil.copytree(Path(sandbox.__file__).parent, root / "pkg" / "kvp_validate",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (root / "runner.py").write_text(RUNNER)
        (root / "table.json").write_text(json.dumps([programs(host), sorted(SLOW), guard]))
        for p in (root / "pkg").rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "pkg").chmod(0o755)
        proc = subprocess.run(["/usr/bin/python3", "-I", str(root / "runner.py"), str(root / "pkg"),
                               str(root / "table.json"), "kvp_sandbox_runner"], capture_output=True, text=True,
                              user=NORMAL_UID, group=NORMAL_UID, extra_groups=[], cwd=root,
                              env={"PATH": "/usr/bin:/bin"}, timeout=300)
        if proc.returncode != 0 and "could not start a sandbox" in proc.stderr:
            pytest.skip(f"no unprivileged sandbox here: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads(proc.stdout)
        print(json.dumps({n: (r["status"], r["detail"][:80]) for n, r in results.items()}, indent=1))
        # the runner's own files are expected in root; the host checks look at root/outside
        check_table(results, host, NORMAL_UID)
        assert "userns" in next(iter(results.values()))["layers"]
    finally:
        host.close()
        shutil.rmtree(root, ignore_errors=True)


def test_canonical_solution_passes_and_wrong_one_fails_in_the_os_sandbox():
    problems = {p.task_id: p for p in load_problems(ids=["0", "162"])}
    for p in problems.values():
        r = check(p, p.canonical_solution)
        assert r.status == "passed", r
        assert {"bwrap", "unprivileged-uid", "mountns", "netns", "pidns", "guard"} <= set(r.layers)
    wrong = check(problems["HumanEval/0"], "    return None\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail


def test_sandbox_sees_only_interpreter_stdlib_and_its_folder():
    prog = ("import os, sys, json\n"
            "raise RuntimeError(json.dumps({'root': sorted(os.listdir('/')), 'uid': os.getuid(),"
            " 'cwd': os.getcwd(), 'path': sys.path, 'folder': sorted(os.listdir('.'))}))\n")
    r = run_sandboxed(prog)
    seen = json.loads(r.detail.split("RuntimeError: ", 1)[1])
    assert set(seen["root"]) <= {"usr", "bin", "lib", "lib64", "lib32", "libx32", "sbin", "dev", "proc", "sandbox",
                                 *Path(sys.base_prefix).resolve().parts[1:2]}
    assert "etc" not in seen["root"] and "home" not in seen["root"] and "work" not in seen["root"]
    assert seen["cwd"] == "/sandbox" and seen["folder"] == ["_sandbox_child.py", "program.py"]
    assert not any("site-packages" in p for p in seen["path"])
    assert seen["uid"] == (sandbox.SANDBOX_UID if os.geteuid() == 0 else os.geteuid())


def test_refused_without_an_os_sandbox_unless_opted_in(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)")
    with pytest.raises(KvpError, match="refusing to execute generated code: bubblewrap.*--allow-unsafe-execution") as e:
        run_sandboxed("pass")
    assert "\n" not in str(e.value)
    r = run_sandboxed("pass", allow_unsafe=True)
    assert r.status == "passed" and r.layers[0] == "unsafe" and "bwrap" not in r.layers
    from kvp_validate.humaneval import run_humaneval

    calls = []
    with pytest.raises(KvpError, match="refusing"):
        run_humaneval(lambda prompts, n: calls.append(1), limit=1, progress=False)
    assert calls == []  # refused before generating
    from click.testing import CliRunner

    from kvp_validate.cli import validate_cmd

    out = tmp_path / "report"
    res = CliRunner().invoke(validate_cmd, [str(tmp_path), "-o", str(out), "--check", "humaneval"])
    assert isinstance(res.exception, KvpError) and "refusing" in str(res.exception) and not out.exists()


def test_seccomp_filter_shape():
    from kvp_validate import _seccomp

    prog = _seccomp.program()
    if prog is None:
        pytest.skip("no seccomp table for this architecture")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096


def test_kvp_run_refuses_humaneval_before_any_stage(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kvp_export.cli import main

    monkeypatch.setattr(sandbox, "_bwrap", lambda: "forced off by the test")
    out = tmp_path / "run"
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "ci.yaml"
    res = CliRunner().invoke(main, ["run", str(tiny), "-o", str(out), "--set", "validate.checks=[parity, quality, ttft, humaneval]"])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "refusing to execute generated code: forced off by the test" in res.output and not out.exists()


def test_the_table_sees_an_escape_where_there_is_no_os_sandbox(host, monkeypatch):
    """Positive control: on the unsafe path (no bwrap) without the guard, as the old sandbox
    was measured, some attempts do escape, and both the verdict and the host checks show it."""
    monkeypatch.setattr(sandbox, "_bwrap", lambda: "forced off by the test")
    progs = programs(host)
    for name in ("io.FileIO write", "read planted secret"):
        r = run_sandboxed(progs[name], allow_unsafe=True, _guard=False)
        assert r.status == "passed", (name, r)
    assert any("outside folder now holds" in d for d in host.damage())
    host.target.unlink()
    host.victim_proc.kill()
    host.victim_proc.wait()
    assert host.damage() == ["victim process died"]
