"""Escapes that matter when the trainer runs as root (Docker, notebooks, CI) — and as anyone else.

Each test is a hostile candidate. Probes of host kernel interfaces only *open* files for writing and never
write, so a regression is detected without changing the host. `test_escapes_hold_for_the_other_kind_of_trainer`
runs this file and tests/test_sandbox.py again as the other kind of trainer: as uid 65534 when the tests run
as root, as root (through `sudo -n`) when they do not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sdpo_fast.sandbox import SandboxLimits, SandboxUnavailableError, run_tests, sandbox_status

LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=256, tmpfs_mb=16)
SHORT = SandboxLimits(timeout_s=1.5, cpu_s=1, memory_mb=256)
NONE = [{"input": [0], "output": None}]
OTHER_LEG_ENV = "SDPO_SANDBOX_OTHER_LEG"  # set in the re-run (to a file for its uid), so that it does not recurse


@pytest.fixture(scope="module", autouse=True)
def bwrap():
    try:
        sandbox_status(SandboxLimits())
    except SandboxUnavailableError as err:
        if os.environ.get("CI"):
            pytest.fail(f"the sandbox escape tests need a working bwrap: {err}")
        pytest.skip(f"the sandbox escape tests need a working bwrap: {err}")


def test_leg_identity():
    """In the re-run, record who ran it, so that the first run can check the leg really changed user."""
    if os.environ.get(OTHER_LEG_ENV):
        Path(os.environ[OTHER_LEG_ENV]).write_text(f"{os.getuid()} {os.geteuid()}")
    assert isinstance(os.geteuid(), int)


def actual(code: str, limits: SandboxLimits = LIMITS):
    records = run_tests(code, "f", NONE, limits)
    assert records[0].status == "wrong_answer", (records[0].status, records[0].error)
    return records[0].actual


def living_processes(marker: str) -> list[int]:
    """Host processes named `marker` (or with it in their threads' names) that still have an address space."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            names = [(entry / "comm").read_text().strip()]
            names += [(t / "comm").read_text().strip() for t in (entry / "task").iterdir()]
            if marker in names and "VmSize:" in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


# ---------------------------------------------------------------------------------------------- host root


def test_the_candidate_never_holds_host_root():
    """Its uid seen from the host is never 0: neither through its uid map nor in the host's /proc."""
    marker = f"sdpo{uuid.uuid4().hex[:10]}"
    code = (
        "import ctypes, os, time\n"
        "def f(x):\n"
        f"    ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\n"
        "    time.sleep(1.5)\n"
        "    return [open('/proc/self/uid_map').read().split(), open('/proc/self/gid_map').read().split()]\n"
    )
    seen: list[str] = []

    def watch():
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline and not seen:
            for pid in living_processes(marker):
                status = Path(f"/proc/{pid}/status").read_text()
                seen.append(re.search(r"^Uid:\s*(.*)$", status, re.M).group(1))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    uid_map, gid_map = actual(code)
    watcher.join()
    assert seen, "the candidate was never seen in the host's /proc"
    host_uids = {int(u) for u in seen[0].split()}  # real, effective, saved, filesystem
    assert 0 not in host_uids, seen
    assert uid_map[0] == "65534" and uid_map[1] != "0" and uid_map[2] == "1", uid_map
    assert gid_map[1] != "0", gid_map
    if os.geteuid() != 0:
        assert host_uids == {os.getuid()}  # an unprivileged trainer's own uid, as before


# ---------------------------------------------------------------------------------------------- kernel tunables

KERNEL_PATHS = [
    "/proc/sys/kernel/core_pattern",  # a write makes the host run a command as root at the next crash
    "/proc/sys/kernel/modprobe",  # … or at the next unknown binary format
    "/proc/sys/fs/binfmt_misc/register",
    "/proc/sys/vm/drop_caches",
    "/proc/sys/kernel/hostname",
    "/proc/sysrq-trigger",
    "/sys/kernel/uevent_helper",
    "/sys/power/state",
    "/sys/fs/cgroup/cgroup.procs",
]


def test_host_kernel_interfaces_cannot_be_opened_for_writing():
    """Every file under /proc/sys, /proc's other global entries and /sys refuses to open for writing."""
    code = (
        "import os\n"
        "def probe(path, out):\n"
        "    try:\n"
        "        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)\n"  # opened, never written
        "    except OSError:\n"
        "        return\n"
        "    os.close(fd)\n"
        "    out.append(path)\n"
        "def f(x):\n"
        "    writable, seen = [], 0\n"
        f"    for path in {KERNEL_PATHS!r}:\n"
        "        probe(path, writable)\n"
        "    for top in ('/proc/sys', '/proc/irq', '/proc/bus', '/proc/fs', '/proc/driver', '/proc/tty', '/sys'):\n"
        "        for root, dirs, files in os.walk(top):\n"
        "            for name in files:\n"
        "                seen += 1\n"
        "                probe(os.path.join(root, name), writable)\n"
        "            if seen > 20000:\n"
        "                break\n"
        "    for name in os.listdir('/proc'):\n"
        "        if not name.isdigit() and name not in ('self', 'thread-self') and os.path.isfile('/proc/' + name):\n"
        "            probe('/proc/' + name, writable)\n"
        "    return [sorted(set(writable)), seen]\n"
    )
    writable, seen = actual(code, SandboxLimits(timeout_s=20.0, cpu_s=10, memory_mb=256))
    assert writable == [], writable
    assert seen > 0  # the walk did run


# ---------------------------------------------------------------------------------------------- outliving the timeout

# Ways a candidate detaches itself from what is meant to stop it. Each ends by sleeping forever.
DETACH = {
    "clear-parent-death-signal": "libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG = 0\n",
    "setsid-and-ignore-signals": (
        "os.setsid() if os.getsid(0) != os.getpid() else None\n"
        "for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "libc.prctl(1, 0, 0, 0, 0)\n"
    ),
    "close-the-report-early": (  # the parent sees EOF and thinks the run is over
        "libc.prctl(1, 0, 0, 0, 0)\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.close(fd)\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "double-fork-and-threads": (
        "libc.prctl(1, 0, 0, 0, 0)\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        if os.fork() > 0:\n"
        "            os._exit(0)\n"
        "    except OSError:\n"
        "        pass\n"
        "for _ in range(4):\n"
        "    threading.Thread(target=lambda: (libc.prctl(15, MARK, 0, 0, 0), time.sleep(3600))).start()\n"
    ),
}


@pytest.mark.parametrize("detach", list(DETACH.values()), ids=list(DETACH))
def test_nothing_outlives_the_timeout(detach):
    marker = f"sdpo{uuid.uuid4().hex[:10]}"
    body = "".join(f"    {line}\n" for line in detach.splitlines())
    code = (
        "import ctypes, os, signal, threading, time\n"
        f"MARK = b'{marker}'\n"
        "libc = ctypes.CDLL(None)\n"
        "def f(x):\n"
        "    libc.prctl(15, MARK, 0, 0, 0)\n"
        f"{body}"
        "    while True:\n"
        "        time.sleep(1)\n"
    )
    start = time.perf_counter()
    records = run_tests(code, "f", NONE, SHORT)
    elapsed = time.perf_counter() - start
    assert records[0].status in ("timeout", "runtime_error") and not records[0].passed
    assert elapsed < SHORT.timeout_s + 3.0
    assert living_processes(marker) == []  # gone when run_tests returns …
    time.sleep(0.5)
    assert living_processes(marker) == []  # … and nothing comes back


# ---------------------------------------------------------------------------------------------- memory and threads

WRITE_EVERYWHERE = (
    "import ctypes, mmap, os\n"
    "CHUNK = b'x' * (1 << 20)\n"
    "def fill(path, limit_mb):\n"
    "    written = 0\n"
    "    try:\n"
    "        with open(path, 'wb') as out:\n"
    "            for _ in range(limit_mb):\n"
    "                out.write(CHUNK)\n"
    "                out.flush()\n"
    "                written += 1\n"
    "    except OSError:\n"
    "        pass\n"
    "    return written\n"
    "def f(x):\n"
    "    out = {}\n"
    "    for d in ('/dev/shm', '/dev', '/dev/mqueue', '/run', '/run/lock', '/var/tmp', '/var/lock', '/', '/proc',\n"
    "              '/home', '/root', '/etc', '/tmp'):\n"
    "        total = 0\n"
    "        for i in range(12):\n"  # several files: a per-file size limit is not a bound
    "            got = fill(f'{d}/spill{i}', 4)\n"
    "            total += got\n"
    "            if got == 0:\n"
    "                break\n"
    "        out[d] = total\n"
    "    held = []\n"  # memfds: memory outside the address-space limit while they stay open
    "    try:\n"
    "        for _ in range(12):\n"
    "            fd = os.memfd_create('spill')\n"
    "            held.append(fd)\n"
    "            for _ in range(4):\n"
    "                os.write(fd, CHUNK)\n"
    "    except OSError:\n"
    "        pass\n"
    "    out['memfd'] = sum(os.fstat(fd).st_size for fd in held) >> 20\n"
    "    libc = ctypes.CDLL(None, use_errno=True)\n"  # System V shared memory: kept after detaching
    "    libc.shmat.restype = ctypes.c_void_p\n"
    "    kept = 0\n"
    "    for _ in range(4):\n"
    "        shm = libc.shmget(0, 16 << 20, 0o1600)\n"
    "        if shm < 0:\n"
    "            break\n"
    "        addr = libc.shmat(shm, None, 0)\n"
    "        if addr in (None, ctypes.c_void_p(-1).value):\n"
    "            break\n"
    "        ctypes.memset(addr, 1, 16 << 20)\n"
    "        libc.shmdt(ctypes.c_void_p(addr))\n"
    "        kept += 16\n"
    "    out['sysv-shm'] = kept\n"
    "    return out\n"
)


def test_every_writable_filesystem_is_bounded_and_counted():
    """Memory the candidate can fill outside its address-space limit adds up to at most the /tmp size."""
    written = actual(WRITE_EVERYWHERE, SandboxLimits(timeout_s=20.0, cpu_s=10, memory_mb=256, tmpfs_mb=16))
    assert 1 <= written["/tmp"] <= 16, written  # /tmp works, up to its size …
    assert sum(written.values()) <= 16, written  # … and nothing else holds memory beside it


def test_threads_are_limited_whoever_the_trainer_is():
    code = (
        "import threading\n"
        "def f(x):\n"
        "    gate, started = threading.Event(), []\n"
        "    def spawn():\n"  # threads that start threads: a bomb, not a loop
        "        started.append(1)\n"
        "        for _ in range(2):\n"
        "            try:\n"
        "                threading.Thread(target=spawn, daemon=True).start()\n"
        "            except RuntimeError:\n"
        "                pass\n"
        "        gate.wait()\n"
        "    for _ in range(400):\n"
        "        try:\n"
        "            threading.Thread(target=spawn, daemon=True).start()\n"
        "        except RuntimeError:\n"
        "            break\n"
        "    peak = threading.active_count()\n"
        "    gate.set()\n"
        "    return [peak, len(started)]\n"
    )
    peak, started = actual(code, SandboxLimits(timeout_s=8.0, cpu_s=4, memory_mb=512, max_processes=8))
    assert 1 <= peak <= 8 and started <= 8, (peak, started)


def test_huge_output_on_every_stream_is_bounded():
    code = (
        "import os, sys\n"
        "def f(x):\n"
        "    for fd in (1, 2):\n"
        "        for _ in range(64):\n"
        "            os.write(fd, b'y' * (1 << 20))\n"
        "    sys.stderr.write('z' * (1 << 20))\n"
        "    print('p' * (1 << 22))\n"
        "    return 7\n"
    )
    start = time.perf_counter()
    records = run_tests(code, "f", [{"input": [0], "output": 7}], SandboxLimits(timeout_s=10.0, cpu_s=5))
    assert records[0].passed and len(records[0].stdout) <= 4000
    assert time.perf_counter() - start < 10.0


# ---------------------------------------------------------------------------------------------- the other trainer


def _leg_command(workdir: Path) -> tuple[list[str] | None, str]:
    """The command that re-runs the sandbox tests as the other kind of trainer, or (None, why not)."""
    tests = [str(Path(__file__).with_name("test_sandbox.py")), str(Path(__file__))]
    pytest_args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", "not other_kind"]
    if os.geteuid() == 0:
        from sdpo_fast.sandbox import privileges

        # The sandbox's own privilege drop: as uid 65534, with the interpreter (which may live under /root, 0700)
        # reachable in a private mount namespace; nothing is copied and nothing changes on the host.
        reach = [Path(__file__).parents[1], workdir]
        return privileges.unprivileged_command([sys.executable, *pytest_args], extra_paths=reach), ""
    sudo = subprocess.run(["sudo", "-n", "true"], capture_output=True) if os.path.exists("/usr/bin/sudo") else None
    if sudo is None or sudo.returncode != 0:
        return None, "the root leg needs root or passwordless sudo"
    return ["sudo", "-n", "--preserve-env", sys.executable, *pytest_args], ""


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(OTHER_LEG_ENV)), reason="this is the other leg already")
def test_escapes_hold_for_the_other_kind_of_trainer(tmp_path):
    command, why = _leg_command(tmp_path)
    if command is None:
        message = f"the sandbox escape tests ran only as uid {os.geteuid()}: {why}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    identity = tmp_path / "identity"
    env = {**os.environ, OTHER_LEG_ENV: str(identity), "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    tmp_path.chmod(0o777)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 30, tail
    assert " skipped" not in result.stdout.splitlines()[-1], tail
    assert " failed" not in result.stdout.splitlines()[-1], tail
    ran_as = identity.read_text()  # real and effective uid of the re-run
    assert ran_as == ("65534 65534" if os.geteuid() == 0 else "0 0"), ran_as
