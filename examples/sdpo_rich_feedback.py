"""SDPO with rich feedback: write a Python function, get the failing unit tests back as feedback.

    python examples/sdpo_rich_feedback.py                     # built-in tiny model, CPU
    python examples/sdpo_rich_feedback.py --smoke             # seconds: checks the plumbing only
    python examples/sdpo_rich_feedback.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 50

The reward function runs each completion against the task's unit tests in a separate, resource-limited
Python process (never in the trainer's process) and returns `{"score": 0.0 or 1.0, "feedback": str}`.
The feedback follows the reference implementation's shape for code (LiveCodeBench-style): only failing
tests, at most two, shortest input first, inputs/outputs/expected values cut to 250 characters, the
whole text capped at 2000; a runtime error, a timeout or a format error is shown alone. SDPO's teacher
reads that feedback (or a passing sibling's code) and the policy is distilled towards it.

The sandbox: a fresh `python -I -S` child per completion, in its own session and temporary directory,
stdin closed, with CPU-time, address-space, file-size, open-file and process limits, an audit hook that
refuses process creation, signals, sockets, `ctypes` and file writes/deletions, the privileges of
`nobody` when run as root (if that user can run the interpreter), and a wall-clock timeout after which
the whole process group is killed. It keeps buggy or runaway code (infinite loops, fork bombs, huge
allocations, `os._exit`, reading stdin) from hanging or breaking training. It is *not* a security
boundary against deliberately malicious code: run untrusted models' code in a container or VM.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------- the sandbox

# The child's program. It limits itself before it reads the candidate's code, so no `preexec_fn` is needed
# (which is unsafe in a multi-threaded trainer). It reports on the result file only: what the candidate
# prints goes to a buffer (shown as debug output) and its raw stdout/stderr to /dev/null. Comparison with
# the expected values happens in the trusted parent, so printing fake results gains nothing.
_RUNNER = r"""
import io, json, os, resource, sys, traceback

job_path, result_path, cpu_s, memory_mb, max_files = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
job = json.load(open(job_path))
report = open(result_path, "w", buffering=1)


def emit(**record):
    report.write(json.dumps(record) + "\n")


def limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass


resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
limit(resource.RLIMIT_FSIZE, 4 * 1024 * 1024)
limit(resource.RLIMIT_NOFILE, max_files)
limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_NPROC, 0)  # no new processes (root is exempt: hence the audit hook below)
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.dup2(null, 2)

_DENIED_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.remove", "os.rename", "os.rmdir", "os.truncate",
    "os.chmod", "os.chown", "os.link", "os.symlink", "os.mkdir", "shutil.rmtree", "os.putenv", "os.unsetenv",
    "socket.socket", "socket.__new__", "socket.connect", "socket.bind", "ctypes.dlopen", "resource.setrlimit",
    "os.setuid", "os.setgid", "sys.addaudithook",
}
_DENIED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "socket", "_socket"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def audit(event, args):
    denied = event in _DENIED_EVENTS
    if event == "import":
        denied = args[0].partition(".")[0] in _DENIED_MODULES
    elif event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        denied = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
    if denied:
        what = f"importing {args[0]!r}" if event == "import" else event
        raise PermissionError(f"{what} is not allowed in the sandbox")


sys.addaudithook(audit)
sys.stdin = io.StringIO()
namespace = {"__name__": "__main__"}
try:
    exec(compile(job["code"], "<solution>", "exec"), namespace)
except BaseException as err:
    emit(event="load_error", error=f"{type(err).__name__}: {err}", trace=traceback.format_exc(limit=-3))
    raise SystemExit(0)
function = namespace.get(job["entry_point"])
if not callable(function):
    emit(event="format_error", error=f"no function named {job['entry_point']!r} is defined")
    raise SystemExit(0)
for index, args in enumerate(job["inputs"]):
    emit(event="start", index=index)
    buffer = sys.stdout = io.StringIO()
    try:
        value = function(*args)
    except BaseException as err:
        sys.stdout = sys.__stdout__
        emit(event="error", index=index, error=f"{type(err).__name__}: {err}", stdout=buffer.getvalue()[-4000:])
        break
    sys.stdout = sys.__stdout__
    try:
        encoded = json.dumps(value)
        record = {"value": value} if len(encoded) <= 100_000 else {"repr": repr(value)[:1000], "too_large": True}
    except (TypeError, ValueError, RecursionError, OverflowError):
        record = {"repr": repr(value)[:100_000]}
    emit(event="result", index=index, stdout=buffer.getvalue()[-4000:], **record)
"""


@dataclass
class SandboxLimits:
    """Resource limits of one candidate run (all its tests together)."""

    timeout_s: float = 5.0  # wall clock, including interpreter start-up
    cpu_s: int = 2
    memory_mb: int = 512
    max_open_files: int = 32
    drop_privileges: bool = True  # run as `nobody` when started as root, where possible


@dataclass
class TestRecord:
    """One unit test's outcome, as the feedback formatter needs it."""

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


_PRIVILEGE_DROP_WORKS: bool | None = None


def _unprivileged_user() -> dict[str, int]:
    """`user=`/`group=` for Popen when running as root and `nobody` exists, else nothing."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or _PRIVILEGE_DROP_WORKS is False:
        return {}
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        return {}
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _spawn(command: list[str], workdir: str, limits: SandboxLimits) -> subprocess.Popen:
    global _PRIVILEGE_DROP_WORKS
    options = dict(
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
        start_new_session=True,  # its own process group: a timeout kills everything it started
        close_fds=True,
    )
    drop = _unprivileged_user() if limits.drop_privileges else {}
    if drop:
        try:
            process = subprocess.Popen(command, **options, **drop)
            _PRIVILEGE_DROP_WORKS = True
            return process
        except (PermissionError, OSError) as err:
            _PRIVILEGE_DROP_WORKS = False
            warnings.warn(
                f"The code sandbox cannot run {command[0]} as 'nobody' ({err}); candidates run as this user, "
                "protected by the audit hook and resource limits only.",
                stacklevel=3,
            )
    return subprocess.Popen(command, **options)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


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
    """Run `entry_point(*test["input"])` for every test in a sandboxed child; one record per test.

    `tests` is a list of `{"input": [positional args], "output": expected}` with JSON-compatible values.
    The child never sees the expected outputs.
    """
    limits = limits or SandboxLimits()
    inputs = [list(t["input"]) for t in tests]
    expected = [json.loads(json.dumps(t["output"])) for t in tests]  # tuples → lists, as the child reports them
    calls = [_call_text(entry_point, args) for args in inputs]
    with tempfile.TemporaryDirectory(prefix="sdpo_sandbox_") as workdir:
        os.chmod(workdir, 0o755)
        job_path, result_path = os.path.join(workdir, "job.json"), os.path.join(workdir, "result.jsonl")
        with open(job_path, "w") as f:
            json.dump({"code": code, "entry_point": entry_point, "inputs": inputs}, f)
        Path(result_path).touch()
        os.chmod(job_path, 0o644)
        os.chmod(result_path, 0o666)
        command = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _RUNNER,
            job_path,
            result_path,
            str(limits.cpu_s),
            str(limits.memory_mb),
            str(limits.max_open_files),
        ]
        process = _spawn(command, workdir, limits)
        timed_out = False
        try:
            process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process)  # also reaps anything it left behind
            process.wait()
        with open(result_path, errors="replace") as f:
            lines = f.read(8 * 1024 * 1024).splitlines()
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return _records(events, calls, expected, timed_out, process.returncode, entry_point)


def _records(events, calls, expected, timed_out, returncode, entry_point) -> list[TestRecord]:
    records = [TestRecord(call, exp, "not_run") for call, exp in zip(calls, expected)]
    out_of_time = timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    running: int | None = None  # the test in progress when the child stopped reporting
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
            record.actual = event["value"] if "value" in event else event.get("repr", "?")
            record.status = "passed" if "value" in event and _same(event["value"], record.expected) else "wrong_answer"
    if all(r.status == "not_run" for r in records) and running is None:
        # Nothing ran: the module itself looped, crashed the interpreter or exited.
        for r in records:
            r.while_loading = True
            r.status = "timeout" if out_of_time else "runtime_error"
            r.error = f"the process exited abruptly (exit status {returncode}) while loading the code"
    elif running is not None:
        record = records[running]
        if out_of_time:
            record.status, record.error = "timeout", "Time Limit Exceeded"
        else:
            record.status = "runtime_error"
            record.error = f"the process exited abruptly (exit status {returncode}) inside {entry_point}"
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
    except (TypeError, ValueError):
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

    Score 1.0 when every test passes, else 0.0. Completions are checked in parallel subprocesses.
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = max(1, min(4, os.cpu_count() or 1))
    sandbox_runs: int = 0  # how many candidates actually ran (format errors are caught before)
    __name__ = "unit_tests"  # TRL names reward functions by `__name__`

    def check(self, completion: Any, tests: list[dict[str, Any]], entry_point: str) -> dict[str, Any]:
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        code = extract_code(text)
        if not re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", code):
            feedback = f"Format Error\nThe answer must define a Python function named {entry_point!r}."
            return {"score": 0.0, "feedback": feedback}
        self.sandbox_runs += 1
        records = run_tests(code, entry_point, tests, self.limits)
        passed = all(r.passed for r in records)
        return {"score": float(passed), "feedback": None if passed else format_test_feedback(records)}

    def __call__(self, prompts=None, completions=None, tests=None, entry_point=None, **kwargs) -> list[dict[str, Any]]:
        jobs = list(zip(completions, tests, entry_point))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda job: self.check(*job), jobs))


# ---------------------------------------------------------------------------------------------- tasks


# For a real model (--model): small problems in the style of MBPP.
def _collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


PROBLEMS = [  # (signature, what it returns, test inputs, reference solution)
    ("add_digits(n)", "the sum of the decimal digits of the non-negative integer n", [[0], [7], [123], [9999]],
     lambda n: sum(map(int, str(n)))),
    ("count_vowels(s)", "how many vowels (a, e, i, o, u, either case) the string s contains",
     [["hello"], [""], ["AEIOU xyz"], ["rhythm"]], lambda s: sum(c in "aeiouAEIOU" for c in s)),
    ("second_largest(xs)", "the second largest distinct value of the list xs, or None if there is none",
     [[[1, 2, 3]], [[5, 5, 5]], [[4, 1, 4, 2]], [[-1, -7]], [[10]]],
     lambda xs: sorted(set(xs))[-2] if len(set(xs)) > 1 else None),
    ("is_palindrome(s)", "True if the string s reads the same backwards, ignoring case and non-letters",
     [["Racecar"], ["A man, a plan, a canal: Panama"], ["hello"], [""]],
     lambda s: [c.lower() for c in s if c.isalpha()] == [c.lower() for c in s if c.isalpha()][::-1]),
    ("running_max(xs)", "the list of running maxima of the list xs (element i is max(xs[:i+1]))",
     [[[1, 3, 2, 5]], [[]], [[-2, -3]], [[4, 4, 1]]], lambda xs: [max(xs[: i + 1]) for i in range(len(xs))]),
    ("collatz_steps(n)", "the number of Collatz steps (n -> n/2 if even else 3n+1) from n >= 1 down to 1",
     [[1], [2], [6], [27]], _collatz_steps),
]  # fmt: skip


def problem_rows() -> list[dict[str, Any]]:
    from _common import user_turn  # lazily, like the rest of _common: the sandbox part imports no torch

    rows = []
    for signature, returns, inputs, solve in PROBLEMS:
        prompt = (
            f"Write a Python function `{signature}` that returns {returns}. "
            "Answer with the complete function in a single ```python code block and nothing else."
        )
        tests = [{"input": i, "output": solve(*i)} for i in inputs]
        rows.append({"prompt": user_turn(prompt), "tests": tests, "entry_point": signature.partition("(")[0]})
    return rows


# For the tiny model: one-line functions `def f ( x ) : return x + 3`, whose tokens the word-level
# tokenizer joins with spaces into valid Python.
OPS = {"plus": "+", "minus": "-", "times": "*"}
TINY_WORDS = ["f", "that", "returns", "format", "wrong", "runtime", "limit", "exceeded", "stdout", "expected"]


def tiny_rows() -> list[dict[str, Any]]:
    from _common import user_turn

    rows = []
    for word, op in OPS.items():
        for d in range(10):
            prompt = f"Write a python function f that returns x {word} {d}."
            tests = [{"input": [x], "output": eval(f"{x} {op} {d}")} for x in (0, 1, 2, 5, 7)]
            rows.append({"prompt": user_turn(prompt), "tests": tests, "entry_point": "f"})
    return rows


def tiny_warmup_example(rng: random.Random):
    """Format-only warm-up: any syntactically valid one-liner (a random operator and digit), half with a demo."""
    from _common import teacher_content, user_turn

    word, d = rng.choice(list(OPS)), rng.randrange(10)
    answer = f"def f ( x ) : return x {rng.choice(list(OPS.values()))} {rng.randrange(10)}"
    question = f"Write a python function f that returns x {word} {d}."
    if rng.random() < 0.5:
        return user_turn(teacher_content(question, demonstration=answer)), answer
    return user_turn(question), answer


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    from _common import (
        Timer,
        finish_args,
        grpo_args,
        load_hub_model,
        make_parser,
        mean_logged,
        print_summary,
        quarter_means,
        supervised_warmup,
        tiny_model,
        train_with_progress,
    )

    parser = make_parser(__doc__, steps=30, smoke_steps=2)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--num-generations", type=int, default=8)
    args = finish_args(parser.parse_args(), "sdpo_rich_feedback")

    from datasets import Dataset

    from sdpo_fast import SDPOConfig, SDPOTrainer

    facts: dict[str, Any] = {}
    if args.model:
        model, tokenizer = load_hub_model(args.model)
        rows, max_len, lr = problem_rows(), 512, args.learning_rate or 1e-6
        facts["model"] = args.model
    else:
        model, tokenizer = tiny_model(TINY_WORDS, seed=args.seed)
        steps = 3 if args.smoke else 300
        with Timer() as t:
            supervised_warmup(model, tokenizer, tiny_warmup_example, steps=steps, seed=args.seed)
        rows, max_len, lr = tiny_rows(), 14, args.learning_rate or 1e-3
        facts.update(model="tiny-qwen2 (built in code)", warmup_steps=steps, warmup_seconds=round(t.seconds, 1))

    prompts_per_step = 4
    rng = random.Random(args.seed)
    picked = [rng.choice(rows) for _ in range(args.max_steps * prompts_per_step)]
    dataset = Dataset.from_list(picked)
    reward = CodeReward()
    trainer = SDPOTrainer(
        model,
        reward,
        args=grpo_args(
            args.output_dir,
            seed=args.seed,
            max_steps=args.max_steps,
            learning_rate=lr,
            per_device_train_batch_size=prompts_per_step * args.num_generations,
            num_generations=args.num_generations,
            max_completion_length=max_len,
        ),
        # The reference's rich-feedback run: reverse KL (alpha=1), K=20, EMA rate 0.01.
        sdpo_config=SDPOConfig(distillation_alpha=1.0, distillation_topk=20, teacher_update_rate=0.01),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    curve, logs, seconds = train_with_progress(trainer)

    # What the teacher is shown for a broken attempt (run through the same sandbox).
    probe = rows[0]
    broken = f"def {probe['entry_point']}(*args):\n    return 1 // 0"
    example = reward(completions=[broken], tests=[probe["tests"]], entry_point=[probe["entry_point"]])
    print("\nExample feedback for a broken completion:\n" + example[0]["feedback"])

    print_summary(
        "sdpo_rich_feedback summary",
        {
            **facts,
            "steps": trainer.state.global_step,
            "generations": curve[-1][0] if curve else 0,
            "train_seconds": round(seconds, 1),
            "reward_first_quarter": quarter_means(curve)[0],
            "reward_last_quarter": quarter_means(curve)[1],
            "mean_feedback_used_fraction": mean_logged(logs, "self_distillation/feedback_used_fraction"),
            "completions_checked": len(curve) * prompts_per_step * args.num_generations,
            "sandbox_runs": reward.sandbox_runs,
        },
        args.output_dir,
    )


if __name__ == "__main__":
    main()
