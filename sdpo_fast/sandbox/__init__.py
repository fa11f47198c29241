"""Run generated Python against unit tests in an OS-level sandbox, and turn the results into SDPO feedback.

    from sdpo_fast.sandbox import CodeReward
    trainer = SDPOTrainer(model, CodeReward(), ...)     # dataset columns: tests, entry_point

Each candidate runs in a fresh `python -I -S` (standard library only) under bubblewrap, never as host root:
under a root trainer bubblewrap itself runs as an unprivileged host uid (`privileges.py`). The threat model,
what holds and what does not, is in docs/sandbox.md. The pieces, one capability per file:

- `limits.py`      `SandboxLimits`, `SandboxUnavailableError`, the environment variables
- `command.py`     the bubblewrap command line: namespaces, read-only host view, the one bounded tmpfs
- `privileges.py`  (+ `_trampoline.py`) dropping host root before bubblewrap starts
- `_seccomp.py`    the syscall filter; `_runner.py` the program inside
- `process.py`     one run: feeding the job, reading the bounded report, killing the PID namespace
- `isolation.py`   finding and probing `bwrap`, `sandbox_status`, `check_sandbox`, the refusal
- `report.py`      parsing the untrusted report; `compare.py` comparing values, digests, differences
- `run.py`         `run_tests`, `TestRecord`, `parse_tests`; `feedback.py` `format_test_feedback`
- `reward.py`      `CodeReward`, `extract_code`

Nothing here imports the training code (trainer, teacher, loss, head, kernels).
"""

from __future__ import annotations

from .command import Bwrap
from .compare import canonical_digest, difference
from .feedback import format_test_feedback
from .isolation import check_sandbox, sandbox_status
from .limits import (
    ALLOW_UNSANDBOXED_ENV,
    BWRAP_ENV,
    HOST_UID,
    INSTALL_HINT,
    SANDBOX_UID,
    SandboxLimits,
    SandboxUnavailableError,
)
from .report import MAX_VALUE_DEPTH
from .reward import CodeReward, extract_code
from .run import TestRecord, parse_tests, run_tests

__all__ = [
    "ALLOW_UNSANDBOXED_ENV",
    "BWRAP_ENV",
    "HOST_UID",
    "INSTALL_HINT",
    "MAX_VALUE_DEPTH",
    "SANDBOX_UID",
    "Bwrap",
    "CodeReward",
    "SandboxLimits",
    "SandboxUnavailableError",
    "TestRecord",
    "canonical_digest",
    "check_sandbox",
    "difference",
    "extract_code",
    "format_test_feedback",
    "parse_tests",
    "run_tests",
    "sandbox_status",
]
