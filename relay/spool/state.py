"""The state directory: its lock, and files and directories only the relay can read.

One process changes the spool at a time. `serve` takes the lock before it touches
anything in state_dir but the directory itself (recovery, the spool writer, the
outbox, the pid file) and holds it for its life; `queue retry|delete` takes it when
no daemon holds it, and asks the daemon's admin listener when one does. The lock is
flock(2) on `<state_dir>/relay.lock`: the kernel drops it when the holder exits,
however it exits (kill -9 included), so there is no stale lock to clean up; it works
in systemd's StateDirectory= and on a container volume (a local file system, or NFS,
where Linux turns flock into a byte-range lock).

The lock file says who holds it (`pid=`, `role=`, and for `serve` the admin
listener's `admin=` address, where the command line reaches the daemon, and the SMTP
listener's `listener=` address, where `sendmail` hands mail when the configuration
names none); a process that cannot take the lock names that holder, and `serving`
tells whether a daemon holds it now. The file is never removed: removing a lock file
lets two processes each lock a file of that name.

Every file and directory made here is created 0600/0700 whatever the umask, and
never through a symbolic link (O_NOFOLLOW; a directory that is a symbolic link is
refused), but for state_dir itself, which may be one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from relay.errors import StateLocked
from relay.spool.files import fsync_dir, write_all

log = logging.getLogger("relay.state")

LOCK_FILE = "relay.lock"
PID_FILE = "relay.pid"
SERVE = "serve"
_HOLDER_BYTES = 256
"""The lock file's content is written over in place at this fixed length, so a
reader sees the old holder or the new one, never an empty file (but at its creation)."""
_UNKNOWN_WAIT = 1.0
"""How long to wait for a new holder to write its name before reporting it unknown."""


def private_dir(path: Path, follow: bool = False) -> None:
    """Make `path` (and missing parents) a directory of mode 0700, whatever the umask,
    and durably: the parent of each directory made is fsynced.

    An existing one is kept, made 0700 when others may use it (it is ours); one that is
    a symbolic link (unless `follow`), or not a directory, raises OSError. `follow` is
    for state_dir itself, which the operator names: systemd's DynamicUser= makes
    /var/lib/NAME a symbolic link to /var/lib/private/NAME."""
    missing: list[Path] = []
    here = path
    while not os.path.lexists(here) and here != here.parent:
        missing.append(here)
        here = here.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
            os.mkdir(directory, 0o700)
    for directory in reversed(missing):
        # A new directory is durable only once its parent is fsynced (fsync(2)): else
        # a power cut can take it away with every file made durable in it since.
        fsync_dir(directory.parent)
    info = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise OSError(errno.ELOOP, "is a symbolic link, not a directory (remove it)", str(path))
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if stat.S_IMODE(info.st_mode) != 0o700 and info.st_uid == os.geteuid():
        os.chmod(path, 0o700)  # just made under a umask, or made open by an earlier version


def open_private(path: Path, flags: int) -> int:
    """Open (or create, 0600 whatever the umask) a regular file, never through a
    symbolic link; OSError when the name is a symbolic link or not a regular file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if flags & os.O_CREAT and stat.S_IMODE(info.st_mode) != 0o600 \
                and info.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_TEMP_BITS = random.Random()


def write_atomically(path: Path, data: bytes | Iterable[bytes], sync: bool = True,
                     staging: Path | None = None) -> None:
    """Replace (or create) the file `path` with `data` (bytes, or chunks written as they
    come), whole or not at all: the one way the relay writes a file it keeps (saved
    envelopes, the pid file, the token store, the admin page's overrides, each message
    of the outbox).

    The bytes go to a temporary file (0600 whatever the umask, never through a symbolic
    link): ".NAME.RANDOM.tmp" beside `path`, or `staging/NAME` when a `staging`
    directory is given (a Maildir's tmp/), which is renamed to `path`; with `sync`, the
    file is fsynced before the rename and `path`'s directory after it, so the new
    content is durable when this returns. A crash leaves the old file or the new one,
    and at worst a temporary file (not an entry: its name starts with a dot, or it is
    in the staging directory). A symbolic link at `path` is replaced, its target
    untouched."""
    if staging is None:
        tmp = path.with_name(f".{path.name}.{_TEMP_BITS.getrandbits(48):012x}.tmp")
    else:
        tmp = staging / path.name
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                write_all(fd, chunk)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as its lock file says."""

    pid: int | None = None
    role: str = ""
    admin: str = ""
    """serve's admin listener, "http://127.0.0.1:8525"; "" until it listens."""
    listener: str = ""
    """serve's SMTP listener as a local client reaches it, "127.0.0.1:2525"; "" until
    it listens."""

    def render(self) -> bytes:
        text = (f"pid={self.pid or ''}\nrole={self.role}\nadmin={self.admin}\n"
                f"listener={self.listener}\n").encode()
        return text[:_HOLDER_BYTES].ljust(_HOLDER_BYTES, b" ")

    @classmethod
    def parse(cls, raw: bytes) -> Holder:
        fields: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip()
        pid = fields.get("pid", "")
        return cls(int(pid) if pid.isdigit() else None, fields.get("role", ""),
                   fields.get("admin", ""), fields.get("listener", ""))

    def describe(self) -> str:
        who = f"sysmail-relay {self.role}" if self.role else "another process"
        return f"{who} (pid {self.pid})" if self.pid else f"{who} (pid not known yet)"


class StateLock:
    """The exclusive lock on one state directory, held until `release` or exit."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None
        self._holder = Holder()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, role: str, wait: float = 0.0) -> None:
        """Take the lock at once, or raise StateLocked naming the holder.

        A holder that is not `serve` (a `queue` command holds it for a moment) is
        waited for up to `wait` seconds. The directory must exist. OSError when the
        lock file cannot be made (a symbolic link, no permission)."""
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait
        unknown_until = time.monotonic() + _UNKNOWN_WAIT
        waiting = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = Holder.parse(os.pread(fd, _HOLDER_BYTES, 0))
                    now = time.monotonic()
                    if not _alive(holder.pid) and now < unknown_until:
                        pass  # taken a moment ago: its holder is writing its name
                    elif holder.role != SERVE and now < deadline and not waiting:
                        waiting = True
                        log.info("waiting up to %.0f s for %s to finish with %s", wait,
                                 holder.describe(), self.state_dir)
                    elif holder.role == SERVE or now >= deadline:
                        raise StateLocked(
                            f"the state directory {self.state_dir} is in use by "
                            f"{holder.describe()}, which holds its lock ({self.path}); one "
                            "relay per state directory: stop that one first, or give this "
                            "one its own state_dir", holder) from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.note(Holder(os.getpid(), role))

    def fileno(self) -> int:
        """The locked file's descriptor: a process that inherits it holds the lock with
        this one, until both have ended (the intake workers)."""
        assert self._fd is not None, "fileno() without the lock"
        return self._fd

    def note(self, holder: Holder) -> None:
        """Say who holds the lock (serve adds its admin address once it listens)."""
        assert self._fd is not None, "note() without the lock"
        os.pwrite(self._fd, holder.render(), 0)
        os.ftruncate(self._fd, _HOLDER_BYTES)
        self._holder = holder

    @property
    def holder(self) -> Holder:
        return self._holder

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def serving(state_dir: Path) -> Holder | None:
    """The `serve` that holds `state_dir`'s lock now, as its lock file names it; None
    when none does (none runs, the file names one that has exited, another command
    holds it) or this user cannot read the file.

    The lock itself is asked (a shared flock, given up at once), not the pid, which
    the system may have given to another process since."""
    try:
        fd = os.open(state_dir / LOCK_FILE,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, _HOLDER_BYTES, 0))
            return holder if holder.role == SERVE else None
        return None  # nobody holds it: the file tells of the past (closing unlocks)
    except OSError:  # not a regular file, an I/O error
        return None
    finally:
        os.close(fd)


def dialable(address: tuple[str, int]) -> str:
    """A bound address as a client on this host reaches it: "127.0.0.1:2525",
    "[::1]:2525"; the wildcards 0.0.0.0 and :: become loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address[0], address[0])
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (the lock file is ours, so hardly)
    return True
