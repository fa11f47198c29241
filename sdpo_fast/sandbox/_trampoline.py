"""Run by `python -I -S -c` as root, just before bubblewrap: become an unprivileged host uid, then exec it.

argv[1] is JSON: `uid`, `gid`, `expose` (directories the new uid must be able to reach) and `argv` (what to
exec). A directory under one the uid cannot enter (say a pyenv under /root, mode 0700) is made reachable
in a private mount namespace of this process only: the blocking directory is covered with a small empty
tmpfs (mode 0755) and the needed directories are bind-mounted back at their own paths. Nothing changes on
the host: the namespace dies with the sandbox, and nothing else of the covered directory is shown.
Then: no supplementary groups, gid and uid set (real, effective, saved), and exec, which drops every
capability. This file is trusted code; no candidate code has run yet.
"""

import ctypes
import json
import os
import stat
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 0x1000, 0x4000, 0x40000, 0x2, 0x4


def fail(message: str) -> None:
    sys.stderr.write(f"sandbox privilege drop: {message}\n")
    sys.exit(126)


def enterable(path: str, uid: int, gid: int) -> bool:
    info = os.stat(path)
    bit = stat.S_IXUSR if info.st_uid == uid else stat.S_IXGRP if info.st_gid == gid else stat.S_IXOTH
    return bool(info.st_mode & bit)


def first_blocked(path: str, uid: int, gid: int):
    """The outermost directory on the way to `path` (itself included) that `uid` cannot enter, or None."""
    parts = path.strip("/").split("/")
    for i in range(len(parts) + 1):
        here = "/" + "/".join(parts[:i])
        if not enterable(here, uid, gid):
            return here
    return None


def expose(paths, uid: int, gid: int) -> None:
    covers = {}
    for path in sorted({os.path.realpath(p) for p in paths}):
        blocked = first_blocked(path, uid, gid)
        if blocked == path or not enterable(path, uid, gid):
            fail(f"{path} itself cannot be entered by uid {uid}; make it world-readable (chmod o+rx).")
        if blocked is not None and not any(path.startswith(done + "/") for done in covers.get(blocked, [])):
            covers.setdefault(blocked, []).append(path)
    if not covers:
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def call(result: int, what: str) -> None:
        if result != 0:
            fail(f"{what}: {os.strerror(ctypes.get_errno())}")

    blocking = ", ".join(covers)
    call(
        libc.unshare(CLONE_NEWNS),
        f"uid {uid} cannot enter {blocking}, and making it reachable needs a private mount namespace "
        "(CAP_SYS_ADMIN, which this root lacks, as in a default container); install Python where every user can "
        f"read it, or allow entering ({blocking}: chmod o+x); unshare(CLONE_NEWNS)",
    )
    call(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    held = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for paths_ in covers.values() for p in paths_}
    os.umask(0o022)
    for blocked, inside in covers.items():
        call(libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=64k"), blocked)
        for path in inside:
            os.makedirs(path, mode=0o755, exist_ok=True)
            source = f"/proc/self/fd/{held[path]}".encode()
            call(libc.mount(source, path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
    for fd in held.values():
        os.close(fd)


def main() -> None:
    spec = json.loads(sys.argv[1])
    uid, gid = spec["uid"], spec["gid"]
    expose(spec["expose"], uid, gid)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() == 0 or os.getegid() == 0 or 0 in os.getgroups():
        fail("still root after the drop")
    os.execv(spec["argv"][0], spec["argv"])


main()
