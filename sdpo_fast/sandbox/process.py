"""One sandboxed run: start it, feed its job, read its report (bounded), and make sure nothing of it survives.

Stopping is by PID namespace: bubblewrap reports the host PID of the sandbox's PID 1 (`--info-fd`); a
pidfd to it is taken at once, and at the end SIGKILL goes to it, which the kernel extends to every process
of the namespace. Nothing the candidate does inside (setsid, clearing its parent-death signal, closing its
report early, threads) takes it out of its PID namespace, so when `run_tests` returns the candidate's code
has stopped. The parent-death signal (`--die-with-parent`, which seccomp stops the candidate from clearing)
covers a trainer that is itself killed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from . import _seccomp, privileges
from .command import ENV, RUNNER, Bwrap, bwrap_command, interpreter
from .limits import SandboxLimits

VALUE_SHARE = 0.75  # of max_output_bytes: what returned values may take in full, before digests stand in


@dataclass
class _Run:
    stdout: bytes
    stderr: bytes
    returncode: int
    timed_out: bool
    complete: bool  # stdout was read to its end (not cut at max_output_bytes)


def _execute_job(job: dict[str, Any], limits: SandboxLimits, bwrap: Bwrap | None) -> _Run:
    numbers = ("cpu_s", "memory_mb", "file_size_mb", "max_open_files", "max_processes")
    job_limits = {name: math.ceil(getattr(limits, name)) for name in numbers}
    job_limits["value_chars"] = int(limits.max_output_bytes * VALUE_SHARE)
    data = json.dumps({**job, "limits": job_limits}).encode()
    if bwrap is None:
        with tempfile.TemporaryDirectory(prefix="sdpo_unsandboxed_") as workdir:  # 0700, private to this run
            return _communicate([interpreter(), "-I", "-S", "-c", RUNNER], data, limits, cwd=workdir)
    fds: list[int] = []
    try:
        info_read, info_write = os.pipe()
        fds += [info_read, info_write]
        seccomp_fd = None
        program = _seccomp.program()
        if program is not None:
            seccomp_fd, seccomp_write = os.pipe()
            fds += [seccomp_fd, seccomp_write]
            os.write(seccomp_write, program)  # a few hundred bytes: fits the pipe buffer
            os.close(seccomp_write)
            fds.remove(seccomp_write)
        command = bwrap_command(bwrap, limits, seccomp_fd, info_write)
        if privileges.dropping():
            command = privileges.unprivileged_command(command, limits.host_uid)
        passed = (info_write,) if seccomp_fd is None else (info_write, seccomp_fd)
        return _communicate(command, data, limits, pass_fds=passed, info_fd=info_read, owned=fds)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _communicate(command, data: bytes, limits: SandboxLimits, cwd=None, pass_fds=(), info_fd=None, owned=None) -> _Run:
    """Feed `data` to stdin, read stdout (bounded) and stderr (4 KiB) until exit, the deadline or the bound.

    `pass_fds` are closed here once bubblewrap holds its copies (and taken out of `owned`), so that the
    info pipe reaches EOF when bubblewrap closes it.
    """
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(ENV),
        cwd=cwd,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,  # its own process group, killed as a whole below
    )
    sandbox_pid1 = None
    try:
        for fd in pass_fds:  # our copies: bubblewrap holds its own now
            os.close(fd)
            if owned is not None:
                owned.remove(fd)
        if info_fd is not None:
            sandbox_pid1 = _sandbox_pidfd(info_fd, process.pid, time.monotonic() + max(10.0, limits.timeout_s))
        out, err, timed_out, overflow = _pump(process, data, limits)
    finally:  # whatever happened here (even an exception in the trainer), nothing of the candidate keeps running
        if sandbox_pid1 is not None:
            _kill_namespace(sandbox_pid1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_for_eof(process.stdout.fileno(), time.monotonic() + 5.0)
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                stream.close()
    return _Run(bytes(out), bytes(err), process.returncode, timed_out, complete=not (overflow or timed_out))


def _sandbox_pidfd(info_fd: int, bwrap_pid: int, deadline: float) -> int | None:
    """A pidfd to the sandbox's PID 1, from bubblewrap's `--info-fd` report; None if it never started.

    bubblewrap writes the report before it lets its child go on, so the child is alive here; its parent
    being our bubblewrap (not yet reaped by us) proves the PID was not reused before the pidfd was taken.
    """
    raw = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(info_fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            raw += chunk
    try:
        pid = int(json.loads(raw)["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError):
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            parent = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    except (OSError, StopIteration, ValueError):
        parent = None
    if parent != bwrap_pid:
        os.close(pidfd)
        return None
    return pidfd


def _kill_namespace(pidfd: int) -> None:
    """SIGKILL the sandbox's PID 1 (so its whole PID namespace), and wait until it is gone."""
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with selectors.DefaultSelector() as selector:  # readable once it has exited, namespace torn down
            selector.register(pidfd, selectors.EVENT_READ)
            selector.select(10.0)
    finally:
        os.close(pidfd)


def _pump(process: subprocess.Popen, data: bytes, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Write `data` to stdin and read stdout/stderr without blocking; returns (stdout, stderr, timed out, cut)."""
    deadline = time.monotonic() + limits.timeout_s
    out, err, sent = bytearray(), bytearray(), 0
    with selectors.DefaultSelector() as selector:
        for stream, events in (
            (process.stdin, selectors.EVENT_WRITE),
            (process.stdout, selectors.EVENT_READ),
            (process.stderr, selectors.EVENT_READ),
        ):
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, events)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), True, False
            for key, _ in selector.select(remaining):
                stream = key.fileobj
                if stream is process.stdin:
                    try:
                        sent += os.write(stream.fileno(), data[sent : sent + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it exited without reading its job: its exit status tells why
                        sent = len(data)
                    if sent >= len(data):
                        selector.unregister(stream)
                        stream.close()  # EOF: the runner starts once it has the whole job
                    continue
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(stream)
                elif stream is process.stdout:
                    out += chunk
                    if len(out) > limits.max_output_bytes:
                        return bytes(out[: limits.max_output_bytes]), bytes(err), False, True
                elif len(err) < 4096:
                    err += chunk[: 4096 - len(err)]
    return bytes(out), bytes(err), False, False


def _wait_for_eof(fd: int, deadline: float) -> None:
    """Discard the rest of the candidate's stdout until every writer has closed it (or the deadline)."""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                try:
                    if not os.read(fd, 65536):
                        return
                except BlockingIOError:
                    continue
