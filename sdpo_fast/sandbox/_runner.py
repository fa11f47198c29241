"""The program inside the code sandbox. `sdpo_fast.sandbox` runs its source with `python -I -S -c`.

Protocol: one JSON job on stdin (`code`, `entry_point`, `inputs`, `limits`), read to EOF; then JSON lines
on the original stdout: `ready`, then `start`/`result`/`error` per test, or one `load_error`/`format_error`.
Nothing here is trusted by the parent: the candidate runs in this process and may rewrite any of it. The
expected outputs never come here, and the parent compares, bounds and validates everything it reads, so
tampering only spoils the candidate's own report. The isolation is bubblewrap's, not this file's.
"""

import hashlib
import io
import json
import os
import resource
import sys
import traceback

PREVIEW_CHARS = 1000  # what is shown of a value sent as a digest, or of one that is not JSON
MAX_STDOUT_CHARS = 4000  # the tail of what the candidate printed during one test


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    report = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the candidate's own prints and reads go nowhere
        os.dup2(null, fd)
    os.close(null)
    sys.stdin = io.StringIO()

    def emit(**record) -> None:
        report.write(json.dumps(record) + "\n")

    limit_self(job["limits"])
    budget = [job["limits"]["value_chars"]]  # returned values sent in full, all tests together
    emit(event="ready")
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(job["code"], "<solution>", "exec"), namespace)
    except BaseException as err:
        emit(event="load_error", error=describe(err), trace=traceback.format_exc(limit=-3))
        return
    function = namespace.get(job["entry_point"])
    if not callable(function):
        emit(event="format_error", error=f"no function named {job['entry_point']!r} is defined")
        return
    for index, args in enumerate(job["inputs"]):
        emit(event="start", index=index)
        buffer = sys.stdout = io.StringIO()
        try:
            value = function(*args)
        except BaseException as err:
            sys.stdout = sys.__stdout__
            emit(event="error", index=index, error=describe(err), stdout=buffer.getvalue()[-MAX_STDOUT_CHARS:])
            return
        sys.stdout = sys.__stdout__
        emit(event="result", index=index, stdout=buffer.getvalue()[-MAX_STDOUT_CHARS:], **encode(value, budget))


def limit_self(limits: dict) -> None:
    """Hard limits (soft = hard, so the candidate cannot raise them again)."""
    for name, value in (
        ("RLIMIT_CPU", limits["cpu_s"]),  # at the hard limit the kernel sends SIGKILL
        ("RLIMIT_AS", limits["memory_mb"] * 2**20),
        ("RLIMIT_FSIZE", limits["file_size_mb"] * 2**20),
        ("RLIMIT_NOFILE", limits["max_open_files"]),
        ("RLIMIT_NPROC", limits["max_processes"]),
        ("RLIMIT_CORE", 0),
    ):
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # an unprivileged process cannot raise a hard limit
        resource.setrlimit(which, (value, value))


def describe(err: BaseException) -> str:
    try:
        return f"{type(err).__name__}: {err}"
    except BaseException:  # an exception whose __str__ fails
        return type(err).__name__


def encode(value, budget: list) -> dict:
    """The value in full while the report has room; beyond, its digest (exact comparison) and a preview."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError, OverflowError):
        return {"repr": safe_repr(value, PREVIEW_CHARS)}
    if len(text) <= budget[0]:
        budget[0] -= len(text)
        return {"value": value}
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()  # as sdpo_fast.sandbox.compare.canonical_digest
    return {"repr": text[:PREVIEW_CHARS], "digest": digest, "chars": len(text)}


def safe_repr(value, chars: int) -> str:
    try:
        return repr(value)[:chars]
    except BaseException:
        return f"<unprintable {type(value).__name__}>"


if __name__ == "__main__":
    main()
