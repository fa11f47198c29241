"""The bubblewrap command line: which namespaces, which host directories (read-only), which writable space.

The view inside: a read-only root holding the interpreter's prefix and the system libraries; a /proc of the
sandbox's own PID namespace whose global, host-wide entries (/proc/sys, /proc/sysrq-trigger, …) are bound
read-only; no /sys; a read-only /dev with only null, zero, full, random and urandom (no /dev/shm, no
/dev/pts); and one writable filesystem, /tmp, a tmpfs of `tmpfs_mb`. Where the bwrap build cannot size a
tmpfs (`--size`, bubblewrap ≥ 0.10), /tmp is read-only too: an unbounded writable tmpfs is never mounted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .limits import SANDBOX_UID, SandboxLimits

RUNNER = Path(__file__).with_name("_runner.py").read_text()
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONHASHSEED": "0"}
DEVICES = ("null", "zero", "full", "random", "urandom")
# Host-wide kernel interfaces under /proc. Writing to them needs host root, which the sandbox never is; bound
# read-only anyway, so that a kernel that gets a permission check wrong still refuses with EROFS.
PROC_COVERS = ("sys", "sysrq-trigger", "irq", "bus", "fs", "driver", "tty", "acpi", "scsi", "sysvipc")


@dataclass(frozen=True)
class Bwrap:
    path: str
    version: str
    supports_size: bool  # --size for a tmpfs (bubblewrap ≥ 0.10; Debian 12 has 0.8)


def interpreter() -> str:
    """The base interpreter (not a venv's launcher): with -I -S it needs only its own prefix."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def host_directories(python: str) -> list[str]:
    """The interpreter prefixes outside /usr that the sandbox shows (read-only)."""
    roots = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(python))}
    return sorted(
        r for r in {os.path.realpath(r) for r in roots} if r not in ("/", "/usr") and not r.startswith("/usr/")
    )


def _ro_mounts(python: str) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: keep the link
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for root in host_directories(python):
        args += ["--ro-bind", root, root]
    return [*args, "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]


def _proc_and_dev(bwrap: Bwrap) -> list[str]:
    args = ["--proc", "/proc"]
    for name in PROC_COVERS:
        args += ["--ro-bind-try", f"/proc/{name}", f"/proc/{name}"]
    if bwrap.supports_size:
        args += ["--size", str(1 << 16)]
    args += ["--tmpfs", "/dev"]
    for name in DEVICES:
        args += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "0"), ("stdout", "1"), ("stderr", "2")):
        target = target if target.startswith("/") else f"/proc/self/fd/{target}"
        args += ["--symlink", target, f"/dev/{link}"]
    return [*args, "--remount-ro", "/dev"]


def bwrap_command(bwrap: Bwrap, limits: SandboxLimits, seccomp_fd: int | None, info_fd: int) -> list[str]:
    python = interpreter()
    cmd = [bwrap.path, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    cmd += ["--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL"]
    cmd += ["--info-fd", str(info_fd), "--clearenv"]
    for key, value in ENV.items():
        cmd += ["--setenv", key, value]
    cmd += _ro_mounts(python)
    cmd += _proc_and_dev(bwrap)
    if bwrap.supports_size:
        cmd += ["--size", str(limits.tmpfs_mb * 2**20), "--tmpfs", "/tmp"]
    else:  # no way to bound it: no writable filesystem at all
        cmd += ["--tmpfs", "/tmp", "--remount-ro", "/tmp"]
    cmd += ["--remount-ro", "/", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return [*cmd, "--", python, "-I", "-S", "-c", RUNNER]
