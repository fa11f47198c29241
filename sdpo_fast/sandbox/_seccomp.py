"""A small seccomp-BPF program for the code sandbox, handed to bubblewrap with `--seccomp FD`.

Namespaces already hide the host; the filter narrows what is left inside them. It refuses (EPERM) new
processes (threads stay allowed), namespace and mount calls, ptrace and cross-process memory access,
kernel keyrings, BPF, io_uring, perf, module/kexec/reboot/swap/clock calls, memory-backed files and IPC
that no limit counts (memfd, System V shm and message queues, POSIX message queues), changing the
parent-death signal, and sockets other than AF_UNIX. `clone3` answers ENOSYS, so glibc falls back to `clone`, whose flags the filter can read (a
`clone3` flag word sits behind a pointer). A foreign syscall ABI (i386/x32 on x86-64) kills the process.

Refusing new processes keeps the candidate one process (its threads counted by RLIMIT_NPROC), which
the PID-namespace kill in `process.py` ends as a whole.

Syscall numbers are per architecture; `program()` returns None on an architecture without a table
(the sandbox then runs without the filter and says so in `sandbox_status()`).
"""

from __future__ import annotations

import errno
import platform
import socket
import struct

# Calls nobody's unit-test solution needs, by name → number (x86-64 table, then the generic table
# that aarch64 uses; aarch64 has no fork/vfork/iopl/ioperm/uselib).
_DENIED = {
    "fork": (57, None),
    "vfork": (58, None),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438),
    "personality": (135, 92),
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "userfaultfd": (323, 282),
    "perf_event_open": (298, 241),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "syslog": (103, 116),
    "vhangup": (153, 58),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "iopl": (172, None),
    "ioperm": (173, None),
    "uselib": (134, None),
    "lookup_dcookie": (212, 18),
    # Memory outside the address-space limit and outside the one bounded tmpfs (/tmp): memfd files,
    # System V shared memory and message queues, POSIX message queues.
    "memfd_create": (319, 279),
    "memfd_secret": (447, 447),
    "shmget": (29, 194),
    "msgget": (68, 186),
    "mq_open": (240, 180),
}
_CLONE, _CLONE3, _SOCKET, _PRCTL = (56, 220), (435, 435), (41, 198), (157, 167)
_PR_SET_PDEATHSIG = 1  # clearing it would let the candidate outlive a killed trainer
_ARCHES = {  # machine → (AUDIT_ARCH_*, column in the tables above)
    "x86_64": (0xC000003E, 0),
    "aarch64": (0xC00000B7, 1),
}
_X32_BIT = 0x40000000  # x86-64 syscall numbers with this bit are the x32 ABI

_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# Classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg 0's low word on little-endian machines)


def program(machine: str | None = None) -> bytes | None:
    """The compiled filter for this machine (struct sock_filter[]), or None where there is no table."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        return None
    audit_arch, column = _ARCHES[machine]
    denied = sorted({nrs[column] for nrs in _DENIED.values() if nrs[column] is not None})
    code: list[tuple] = [("ld", _ARCH), ("jeq", audit_arch, None, "kill"), ("ld", _NR)]
    if machine == "x86_64":
        code.append(("jge", _X32_BIT, "deny", None))
    code += [("jeq", nr, "deny", None) for nr in denied]
    code += [
        ("jeq", _CLONE[column], "clone", None),
        ("jeq", _CLONE3[column], "enosys", None),
        ("jeq", _SOCKET[column], "socket", None),
        ("jeq", _PRCTL[column], "prctl", None),
        ("ret", _RET_ALLOW),
        "prctl",
        ("ld", _ARG0),
        ("jeq", _PR_SET_PDEATHSIG, "deny", "allow"),
        "clone",  # a thread (CLONE_THREAD, no new namespace) is fine; a new process is not
        ("ld", _ARG0),
        ("jset", _CLONE_NAMESPACES, "deny", None),
        ("jset", _CLONE_THREAD, "allow", "deny"),
        "socket",
        ("ld", _ARG0),
        ("jeq", socket.AF_UNIX, "allow", "deny"),
        "allow",
        ("ret", _RET_ALLOW),
        "deny",
        ("ret", _RET_ERRNO | errno.EPERM),
        "enosys",
        ("ret", _RET_ERRNO | errno.ENOSYS),
        "kill",
        ("ret", _RET_KILL_PROCESS),
    ]
    return _assemble(code)


def _assemble(code: list) -> bytes:
    """Resolve label names to relative jump offsets and pack the instructions."""
    labels, position = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = position
        else:
            position += 1
    out, position = [], 0
    for item in code:
        if isinstance(item, str):
            continue
        position += 1  # jumps count from the next instruction
        if item[0] == "ld":
            out.append(struct.pack("=HBBI", _LD_W_ABS, 0, 0, item[1]))
        elif item[0] == "ret":
            out.append(struct.pack("=HBBI", _RET, 0, 0, item[1]))
        else:
            op = {"jeq": _JEQ, "jge": _JGE, "jset": _JSET}[item[0]]
            jt, jf = (0 if label is None else labels[label] - position for label in item[2:])
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise AssertionError(f"seccomp jump out of range in {item}")
            out.append(struct.pack("=HBBI", op, jt, jf, item[1]))
    return b"".join(out)
