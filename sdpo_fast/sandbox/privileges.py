"""Who the sandbox runs as on the host: the trainer's own uid, or, under a root trainer, an unprivileged one.

Bubblewrap maps the sandbox's uid to the uid that starts it. Under a root trainer that was host uid 0:
root-owned host files (/proc/sys tunables among them) were the candidate's own, and RLIMIT_NPROC, which the
kernel does not apply to root, did not limit threads. So a root trainer starts bubblewrap through
`_trampoline.py`, which becomes `SandboxLimits.host_uid` (65534, `nobody`, by default) first; directories the
new uid could not enter (a pyenv or venv under /root) are made reachable in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .command import host_directories, interpreter

TRAMPOLINE = Path(__file__).with_name("_trampoline.py").read_text()


def dropping() -> bool:
    """Whether commands must drop host root first (the trainer is root)."""
    return os.geteuid() == 0


def unprivileged_command(argv: Sequence[str], uid: int = 65534, extra_paths: Sequence[str | os.PathLike] = ()):
    """`argv`, run as `uid` (and gid `uid`) by way of the trampoline, with the interpreter reachable.

    Only for a root caller. Also used by the tests to run the sandbox's own tests as an unprivileged trainer.
    """
    python = interpreter()
    paths = [*host_directories(python), os.path.dirname(os.path.realpath(argv[0]))]
    paths += [os.path.realpath(sys.prefix), *(os.fspath(p) for p in extra_paths)]
    spec = {"uid": uid, "gid": uid, "expose": sorted(set(paths)), "argv": list(argv)}
    return [python, "-I", "-S", "-c", TRAMPOLINE, json.dumps(spec)]
