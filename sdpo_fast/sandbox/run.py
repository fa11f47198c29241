"""`run_tests`: a candidate against its unit tests, one `TestRecord` per test."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from typing import Any

from . import isolation, process
from .compare import _same, canonical_digest
from .limits import SandboxLimits, SandboxUnavailableError
from .process import _Run
from .report import _parse


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
    too_large: int = 0  # >0: the returned value (this many characters of JSON) came back as a digest only

    @property
    def passed(self) -> bool:
        return self.status == "passed"


SHAPE = 'a list of {"input": [positional arguments], "output": expected value}, or that list as JSON text'


def parse_tests(tests: Any, where: str = "tests") -> list[dict[str, Any]]:
    """Unit tests as a list of dicts; JSON text is decoded (datasets often store them so, one type per column)."""
    if isinstance(tests, bytes | bytearray):
        tests = tests.decode()
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as err:
            raise ValueError(f"{where} is text but not valid JSON ({err}); it must be {SHAPE}.") from None
    if not isinstance(tests, list | tuple):
        raise TypeError(f"{where} must be {SHAPE}; got {type(tests).__name__}.")
    for i, test in enumerate(tests):
        if not (isinstance(test, dict) and "input" in test and "output" in test):
            raise TypeError(f"{where}[{i}] must be a dict with 'input' and 'output' ({SHAPE}); got {test!r:.200}.")
        if not isinstance(test["input"], list | tuple):
            raise TypeError(
                f"{where}[{i}]['input'] must be the list of positional arguments; got {test['input']!r:.200}."
            )
    return list(tests)


def _call_text(entry_point: str, args: list[Any]) -> str:
    return f"{entry_point}({', '.join(repr(a) for a in args)})"


def run_tests(
    code: str, entry_point: str, tests: list[dict[str, Any]] | str, limits: SandboxLimits | None = None
) -> list[TestRecord]:
    """Run `entry_point(*test["input"])` for every test in a fresh sandbox; one record per test.

    `tests` is a list of `{"input": [positional args], "output": expected}` with JSON-compatible values, or
    that list as JSON text. The sandbox never sees the expected outputs; the comparison happens here.
    Raises `SandboxUnavailableError` when no sandbox works and unisolated runs were not allowed.
    """
    limits = limits or SandboxLimits()
    tests = parse_tests(tests)
    bwrap = isolation._isolation(limits)
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
        run = process._execute_job(job, limits, bwrap)
        events, malformed = _parse(run.stdout, run.complete)
        if bwrap is None or run.timed_out or any(e["event"] == "ready" for e in events):
            break
        if attempt:  # the candidate's code never ran: not its fault, and not something to score
            detail = run.stderr.decode(errors="replace").strip()[-600:] or f"exit status {run.returncode}"
            raise SandboxUnavailableError(f"the sandbox did not start (twice): {detail}")
    return _records(events, calls, expected, run, entry_point, malformed, limits)


def _result(record: TestRecord, event: dict[str, Any]) -> None:
    record.stdout = str(event.get("stdout", ""))
    if "value" in event:
        record.actual = event["value"]
        record.status = "passed" if _same(event["value"], record.expected) else "wrong_answer"
        return
    record.actual = str(event.get("repr", "?"))
    digest, chars = event.get("digest"), event.get("chars")
    if isinstance(digest, str) and isinstance(chars, int) and not isinstance(chars, bool) and chars > 0:
        record.too_large = chars
        record.status = "passed" if digest == canonical_digest(record.expected) else "wrong_answer"
    else:
        record.status = "wrong_answer"


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
            _result(record, event)
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
