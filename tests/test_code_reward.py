"""Code rewards on real data: tests as JSON text, exact comparison of large values, feedback that shows the
difference, the rich-feedback example's dataset, and the sandbox package's boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdpo_fast import sandbox
from sdpo_fast.sandbox import (
    CodeReward,
    SandboxLimits,
    SandboxUnavailableError,
    canonical_digest,
    difference,
    format_test_feedback,
    parse_tests,
    run_tests,
    sandbox_status,
)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = SandboxLimits(timeout_s=5.0, cpu_s=2, memory_mb=256)
SMALL_REPORT = SandboxLimits(timeout_s=5.0, cpu_s=2, memory_mb=256, max_output_bytes=64 * 1024)


@pytest.fixture(scope="module")
def bwrap():
    try:
        return sandbox_status(SandboxLimits())
    except SandboxUnavailableError as err:
        (pytest.fail if __import__("os").environ.get("CI") else pytest.skip)(f"needs a working bwrap: {err}")


needs_bwrap = pytest.mark.usefixtures("bwrap")


# ---------------------------------------------------------------------------------------------- tests as JSON text


def test_parse_tests_accepts_json_text_and_names_bad_shapes():
    tests = [{"input": [[1, 2], "a"], "output": None}, {"input": [3], "output": True}]
    assert parse_tests(json.dumps(tests)) == tests and parse_tests(tests) == tests
    assert parse_tests(json.dumps(tests).encode()) == tests
    with pytest.raises(ValueError, match=r"not valid JSON.*list of"):
        parse_tests("[{'input': [1]")
    with pytest.raises(TypeError, match=r"tests\[0\] must be a dict with 'input' and 'output'"):
        parse_tests('[{"input": [1]}]')
    with pytest.raises(TypeError, match=r"\['input'\] must be the list of positional arguments"):
        parse_tests('[{"input": 1, "output": 2}]')
    with pytest.raises(TypeError, match="must be a list of"):
        parse_tests('{"input": [1], "output": 2}')


@needs_bwrap
def test_code_reward_accepts_tests_as_json_text():
    reward = CodeReward(limits=LIMITS, workers=2)
    tests = json.dumps([{"input": [x], "output": x + 3} for x in (0, 5)])
    good, bad = "def f(x):\n    return x + 3", "def f(x):\n    return x"
    out = reward(completions=[good, bad], tests=[tests, tests], entry_point=["f", "f"])
    assert [o["score"] for o in out] == [1.0, 0.0] and "Wrong Answer" in out[1]["feedback"]
    with pytest.raises(ValueError, match="CodeReward: the row's `tests` is text but not valid JSON"):
        reward(completions=[good], tests=["not json"], entry_point=["f"])


# ---------------------------------------------------------------------------------------------- large values


@needs_bwrap
def test_large_correct_values_pass_in_full_and_by_digest():
    big_list = "def f(n):\n    return list(range(n))"
    records = run_tests(big_list, "f", [{"input": [30000], "output": list(range(30000))}], LIMITS)
    assert records[0].passed and records[0].too_large == 0  # ~190 000 characters, sent in full
    # Beyond three quarters of the report, the value comes back as a digest, compared exactly.
    records = run_tests(
        "def f(n):\n    return 'v' * n", "f", [{"input": [100000], "output": "v" * 100000}], SMALL_REPORT
    )
    assert records[0].passed and records[0].too_large == 100002
    mixed = {"b": [1.5, None, True, "é"], "a": {"z": 1, "y": [2, 3]}, "pad": "p" * 70000}
    code = f"def f():\n    return {mixed!r}"
    records = run_tests(code, "f", [{"input": [], "output": dict(reversed(list(mixed.items())))}], SMALL_REPORT)
    assert records[0].passed and records[0].too_large > 0  # key order does not matter; the digest is canonical


@needs_bwrap
def test_large_wrong_values_say_where_or_that_they_were_too_large():
    expected = list(range(30000))
    expected[12345] = -1
    records = run_tests("def f(n):\n    return list(range(n))", "f", [{"input": [30000], "output": expected}], LIMITS)
    feedback = format_test_feedback(records)
    assert records[0].status == "wrong_answer"
    assert "Difference: at [12345]: output 12345, expected -1" in feedback and len(feedback) <= 2000
    records = run_tests(
        "def f(n):\n    return 'v' * n", "f", [{"input": [100000], "output": "v" * 99999 + "w"}], SMALL_REPORT
    )
    feedback = format_test_feedback(records)
    assert records[0].status == "wrong_answer" and records[0].too_large == 100002
    assert "too large to show" in feedback and "it differs" in feedback and len(feedback) <= 2000


@needs_bwrap
def test_values_that_look_identical_when_shown_get_a_difference_line():
    tests = [{"input": [], "output": "1"}]
    records = run_tests("def f():\n    return 1", "f", tests, LIMITS)
    feedback = format_test_feedback(records)
    assert "Output:\n1\nExpected:\n1\n" in feedback  # the same text …
    assert "Difference: at the top level: the output is of type int (1), the expected value of type string" in feedback
    long = "a" * 1000
    records = run_tests(f"def f():\n    return {long + 'b'!r}", "f", [{"input": [], "output": long + "c"}], LIMITS)
    assert "character 1000 (lengths 1001 and 1001)" in format_test_feedback(records)


def test_difference_and_digest_against_an_independent_reading():
    assert difference([1, [2, 3]], [1, [2, 4]]) == "at [1][1]: output 3, expected 4"
    assert difference({"a": 1}, {"b": 1}).startswith('at the top level: missing keys ["b"], unexpected keys ["a"]')
    assert difference([1, 2], [1, 2, 3]) == "at the top level: the output has 2 items, the expected value 3"
    assert difference(1.0, 1.0 + 1e-9) == ""  # the tolerance of the comparison itself
    import hashlib

    text = '{"a":[1,2.5,null,true],"b":"\\u00e9"}'  # written by hand: sorted keys, no spaces, ASCII
    assert canonical_digest({"b": "é", "a": (1, 2.5, None, True)}) == hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the example's data


def test_rich_feedback_example_builds_a_dataset_with_consistent_types(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import sdpo_rich_feedback as rich

    for rows in (rich.problem_rows(), rich.tiny_rows()):
        dataset = datasets.Dataset.from_list(rows * 2)  # the old mixed-type `tests` column made Arrow fail here
        assert dataset.features["tests"].dtype == "string"
        for row, original in zip(dataset, rows):
            assert parse_tests(row["tests"]) == parse_tests(original["tests"])
    second_largest = next(r for r in rich.problem_rows() if r["entry_point"] == "second_largest")
    outputs = [t["output"] for t in parse_tests(second_largest["tests"])]
    assert outputs == [2, None, 2, -7, None] and type(outputs[0]) is int  # ints stay ints, None stays None
    palindrome = next(r for r in rich.problem_rows() if r["entry_point"] == "is_palindrome")
    assert [type(t["output"]) for t in parse_tests(palindrome["tests"])] == [bool] * 4


# ---------------------------------------------------------------------------------------------- the package


# The sandbox imports nothing of the training code: pyproject.toml's import-linter contract (tests/test_packaging.py).


def test_old_import_path_keeps_every_public_name():
    old_names = [
        "CodeReward", "SandboxLimits", "SandboxUnavailableError", "TestRecord", "extract_code",
        "format_test_feedback", "run_tests", "sandbox_status", "check_sandbox", "INSTALL_HINT",
        "ALLOW_UNSANDBOXED_ENV", "BWRAP_ENV", "SANDBOX_UID", "MAX_VALUE_DEPTH",
    ]  # fmt: skip
    assert all(hasattr(sandbox, name) for name in old_names)
    files = sorted(p.name for p in (ROOT / "sdpo_fast" / "sandbox").glob("*.py"))
    assert not (ROOT / "sdpo_fast" / "sandbox.py").exists() and "_runner.py" in files and "_seccomp.py" in files
    assert all(len((ROOT / "sdpo_fast" / "sandbox" / f).read_text().splitlines()) <= 250 for f in files)
