"""Files and processes of the private servers: backdating, permissions, pid files."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import stat
import time
from pathlib import Path

SBIN_PATH = "/usr/sbin:/sbin"  # Debian puts postfix and dovecot here, often not on a user's PATH


def which(name: str) -> str | None:
    """Like shutil.which, also looking in /usr/sbin and /sbin."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def require(name: str) -> str:
    path = which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (run .ci/install-peers.sh as root)")
    return path


# Postfix refuses to open main.cf or a lookup table whose mtime is within ~2 s of now.
BACKDATE_SECONDS = 60.0


def write_file(path: Path, text: str, mode: int = 0o644, owner: str | None = None) -> Path:
    """Write *text*, set mode/owner and backdate the mtime so Postfix reads it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    if owner is not None:
        chown(path, owner)
    backdate(path)
    return path


def backdate(path: Path) -> None:
    t = time.time() - BACKDATE_SECONDS
    os.utime(path, (t, t))


def chown(path: Path, user: str, group: str | None = None) -> None:
    pw = pwd.getpwnam(user)
    gid = pw.pw_gid
    if group is not None:
        gid = grp.getgrnam(group).gr_gid
    os.chown(path, pw.pw_uid, gid)


def make_dir(path: Path, mode: int = 0o755, owner: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        chown(path, owner)
    return path


def grant_traverse(path: Path) -> list[tuple[Path, int]]:
    """Let unprivileged daemons (postfix, dovecot, nobody) reach *path*.

    pytest creates its temporary directories mode 0700; add o+x (search only,
    no listing) on *path* and its ancestors that lack it. Returns what changed,
    for :func:`restore_modes`.
    """
    changed: list[tuple[Path, int]] = []
    for p in [path, *path.parents]:
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & stat.S_IXOTH:
            continue
        os.chmod(p, mode | stat.S_IXOTH)
        changed.append((p, mode))
    return changed


def restore_modes(changed: list[tuple[Path, int]]) -> None:
    for p, mode in changed:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, mode)


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process from /proc, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> set[tuple[int, int]]:
    """(pid, starttime) of every live descendant of *root*."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append((int(entry.name), st[2]))
    found: set[tuple[int, int]] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def _alive(pid: int, starttime: int | None = None) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (starttime is None or st[2] == starttime)


def terminate_pidfile(pidfile: Path, timeout: float = 10.0) -> int | None:
    """SIGTERM the master whose pid is in *pidfile*; wait until it and its children are gone.

    Returns the pid signalled (None if none was running). Raises TimeoutError
    (after SIGKILLing what is left) if they outlive *timeout*.
    """
    pid = read_pid(pidfile)
    if pid is None or not _alive(pid):
        return None
    master = _stat(pid)
    assert master is not None
    procs = {(pid, master[2]), *_descendants(pid)}
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        procs = {p for p in procs if _alive(*p)}
        if not procs:
            return pid
        if time.monotonic() > deadline:
            for p, _ in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            left = sorted(p for p, _ in procs)
            raise TimeoutError(f"{left} outlived SIGTERM to {pid} ({pidfile})")
        time.sleep(0.02)
