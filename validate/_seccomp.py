"""A seccomp filter for the sandbox, as the classic BPF program bwrap's `--seccomp FD` loads.

Hand-assembled because libseccomp has no Python binding we can pin (Debian's python3-seccomp
is built for the system Python, the PyPI copies are third-party forks). The program is small
and checked by tests: every listed syscall returns EPERM, namespace-creating clone flags
return EPERM, clone3 returns ENOSYS (so glibc falls back to clone, whose flags we can read),
x32 syscalls return EPERM, and any other architecture (e.g. i386 through int 0x80) is killed.

x86_64 only; elsewhere `program()` returns None and the sandbox reports no "seccomp" layer.
"""

from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
RET_KILL_PROCESS, RET_ALLOW = 0x80000000, 0x7FFF0000
RET_ERRNO = 0x00050000
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
X32_BIT = 0x40000000
CLONE_NS_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME

# What sandboxed code never needs: networking at all, other processes' memory, the kernel's
# keyrings, module loading, mounts and namespaces, tracing, bpf, io_uring, ...
DENIED_X86_64 = {
    "socket": 41, "socketpair": 53, "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "vhangup": 153,
    "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
CLONE, CLONE3 = 56, 435


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program() -> bytes | None:
    """The filter (struct sock_filter[]) for this machine, or None where we have no table."""
    if platform.machine() != "x86_64":
        return None
    eperm = _ins(RET_K, RET_ERRNO | errno.EPERM)
    out = [_ins(LD_W_ABS, 4),  # seccomp_data.arch
           _ins(JEQ_K, AUDIT_ARCH_X86_64, jt=1), _ins(RET_K, RET_KILL_PROCESS),
           _ins(LD_W_ABS, 0),  # seccomp_data.nr
           _ins(JGE_K, X32_BIT, jf=1), eperm,
           _ins(JEQ_K, CLONE3, jf=1), _ins(RET_K, RET_ERRNO | errno.ENOSYS)]
    for nr in sorted(DENIED_X86_64.values()):
        out += [_ins(JEQ_K, nr, jf=1), eperm]
    out += [_ins(JEQ_K, CLONE, jf=3),
            _ins(LD_W_ABS, 16),  # args[0], low 32 bits (little endian): the clone flags
            _ins(JSET_K, CLONE_NS_FLAGS, jf=1), eperm,
            _ins(RET_K, RET_ALLOW)]
    return b"".join(out)
