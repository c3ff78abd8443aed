"""The spool: every accepted message on disk until the upstream has it.

One directory per message, holding `message` (the bytes to send) and
`envelope.json` (sender, recipients and their states, attempts). Where the
directory sits is its state:

    incoming/ID    being written; removed at start-up (the client never got 250)
    queue/ID       waiting for delivery (queued, deferred or held)
    active/ID      claimed by a delivery; put back at start-up (a crash), counted
    edit/ID        claimed by `queue retry`; put back at start-up
    dead/ID        dead letter, with the reason in the envelope
    quarantine/ID  damaged entries moved aside, never deleted
    trash/ID       delivered: kept for the next message to be written over (emptied
                   if not reused within a moment), or removed; all deleted at start-up

A message is written into incoming/, its files and directory fsynced, then renamed
into queue/; incoming/ and then queue/ are fsynced: only then does the client get 250. A delivery
claims an entry by renaming it into active/, so two workers (or the daemon and
the command line) never hold the same entry. Nothing is removed before the
upstream has accepted it. `read` takes an entry from one open directory, so an
entry that moves meanwhile is read whole or not found, never called damaged. Every
method here waits for the disk: call it from a thread (the scheduler does, once to
claim and read a message, once to finish it).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import spool_process, spool_writer
from .errors import DamagedEntry, SpoolError
from .spool_writer import ENVELOPE, MESSAGE
from .workers import AwaitedWorker, Worker

log = logging.getLogger("relay.spool")

RecipientState = Literal["pending", "delivered", "failed"]
Place = Literal["queue", "active", "dead", "edit"]
Content = bytes | list[bytes | memoryview]
"""A message's bytes: whole, or in pieces written one after the other."""
_DIRS = ("incoming", "queue", "active", "edit", "dead", "quarantine", "trash")


@dataclass
class Recipient:
    address: str
    state: RecipientState = "pending"
    reply: str | None = None
    options: list[str] = field(default_factory=list)


@dataclass
class Envelope:
    id: str
    sender: str
    """The client's MAIL FROM, before the rewrite ('' for the null sender)."""
    recipients: list[Recipient]
    mail_from: str | None = None
    """The system address the message goes out with; None until the account has one."""
    mail_options: list[str] = field(default_factory=list)
    received_at: float = field(default_factory=time.time)
    age_base: float = 0.0
    """Age for queue.max_age counts from here: receipt, or the last manual retry."""
    size: int = 0
    client: str = ""
    subject: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str | None = None
    crashes: int = 0
    dead_reason: str | None = None
    helo: str | None = None
    """The client's HELO/EHLO name, for the Received line added when the message is sent."""
    protocol: str = "ESMTP"
    """SMTP, ESMTP or UTF8SMTP: the `with` of that Received line."""
    as_received: bool = False
    """True: `message` holds the client's bytes, and the rewrite for the account as it is
    when the message is sent is applied on the way out. False: an entry written by an
    earlier version, whose `message` already holds the bytes to send."""

    def __post_init__(self) -> None:
        if not self.age_base:
            self.age_base = self.received_at

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == "pending"]

    def to_json(self) -> bytes:
        # ASCII escapes: always valid UTF-8 JSON, whatever bytes a client put in an address
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """Parse and check an envelope; ValueError/TypeError/KeyError when it is not one."""
        data: dict[str, Any] = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        env = cls(**data)
        if not env.id or not env.recipients:
            raise ValueError("no id or no recipients")
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(env, name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise ValueError(f"{name} has the wrong type ({type(value).__name__})")
        if not isinstance(env.as_received, bool):
            raise ValueError("as_received is not true or false")
        for rcpt in env.recipients:
            if (not isinstance(rcpt.address, str) or rcpt.state not in _STATES
                    or not isinstance(rcpt.options, list)):
                raise ValueError(f"recipient {rcpt.address!r} is malformed")
        return env


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "sender": str, "mail_options": list, "received_at": (int, float),
    "age_base": (int, float), "size": int, "client": str, "attempts": int,
    "next_attempt": (int, float), "crashes": int, "mail_from": (str, type(None)),
    "helo": (str, type(None)), "protocol": str,
}
_STATES = ("pending", "delivered", "failed")


_ID_BITS = random.Random()
"""Seeded from the operating system's randomness once; an id needs to be unique, not secret."""


def new_queue_id() -> str:
    """Sortable by arrival time, unique without coordination: 13 hex digits of µs + 8 random."""
    return f"{time.time_ns() // 1000:013X}{_ID_BITS.getrandbits(32):08X}"


def read_regular(path: Path | str, dir_fd: int | None = None) -> bytes:
    """A file's bytes; OSError when it is not a regular file (a FIFO must not block us)
    or is a symlink. `path` is relative to the directory `dir_fd` when one is given.

    Open, fstat, one read (a file that grew meanwhile: more), close: without Python's
    file objects."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = os.read(fd, info.st_size + 1)  # short only at the end of the file
        if len(data) <= info.st_size:
            return data
        parts = [data]
        while part := os.read(fd, 1 << 20):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


_SYSTEM_ERRORS = frozenset({errno.EIO, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE,
                            errno.ENOMEM, errno.EAGAIN, errno.EINTR})
"""Errors reading an entry that say nothing about the entry itself."""


def _read_entry(fd: int, queue_id: str, system_errors: bool = False) -> Envelope | str:
    """The envelope in the entry directory `fd`, or what is wrong with the entry (the
    text that follows the entry's path in the DamagedEntry)."""
    try:
        env = Envelope.from_json(read_regular(ENVELOPE, dir_fd=fd))
    except FileNotFoundError:
        return f"/{ENVELOPE}: the envelope is missing"
    except (ValueError, TypeError, KeyError) as e:
        return f"/{ENVELOPE}: the envelope cannot be read ({e})"
    except OSError as e:
        if system_errors and e.errno in _SYSTEM_ERRORS:
            raise
        return f"/{ENVELOPE}: {e.strerror}"
    if env.id != queue_id:
        return f"/{ENVELOPE}: the envelope belongs to {env.id}, not {queue_id}"
    try:
        if not stat.S_ISREG(os.stat(MESSAGE, dir_fd=fd, follow_symlinks=False).st_mode):
            return ": the message file is missing (a directory, link or device in its place)"
    except FileNotFoundError:
        return ": the message file is missing"
    except OSError as e:
        if system_errors and e.errno in _SYSTEM_ERRORS:
            raise
        return f"/{MESSAGE}: {e.strerror}"
    return env


def _still_at(fd: int, entry: Path) -> bool:
    """Whether the directory open as `fd` is still the one at `entry`."""
    try:
        there = os.stat(entry, follow_symlinks=False)
    except OSError:
        return False
    here = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def content_size(data: Content) -> int:
    return len(data) if isinstance(data, bytes) else sum(map(len, data))


def _write_file(path: Path, data: bytes) -> None:
    """Create a file with `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


INLINE_BYTES = 1 << 20
"""Messages up to this size are read whole when they are claimed (in the same thread),
larger ones a chunk at a time as they are sent."""
class _GroupCommit(AwaitedWorker[tuple["Envelope", "Content"], None]):
    """Makes concurrently received messages durable together.

    One thread takes every message waiting and hands them all to the spool writer
    process (relay/spool_writer.py), which writes them, makes them durable (an fsync
    per file and directory, or for a larger batch one syncfs of the file system),
    renames them into queue/ and fsyncs queue/ once: the disk round trips are
    shared, yet no message is acknowledged before its own files and its directory
    entry are on disk. The file system calls run beside the event loop, on the other
    core, without taking turns with it for the interpreter lock (in a thread of this
    process they cost about a sixth of the throughput); the thread wakes the
    loop once per batch.
    """

    MAX_BATCH = 64
    NAME = "spool-commit"

    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self.spool = spool

    def results(self, args: list[tuple[Envelope, Content]]) -> list[Exception | None]:
        try:
            errors: list[Exception | None] = [*self.spool.store_in_writer(args)]
            return errors
        except Exception as e:  # a bug must not stop acceptance: fail this batch, go on
            failure = SpoolError(f"cannot write the message to the spool: {e!r}")
            return [failure] * len(args)


_SWEEP = Path()
"""Handed to the remover: empty the entries kept for reuse that are still full."""


class _Remover(Worker[Path]):
    """Empties delivered entries in trash/, so no delivery waits for it.

    Up to REUSE entries are kept for new messages (`take`): a file system allocates
    and frees inodes dearly (ext4 without a journal scans past every inode freed in
    the last seconds for each one it allocates), and reusing them spares three of
    each per message. The rest are deleted.

    A delivered message up to REUSE_BYTES is kept as it is (`keep`, on the event
    loop, without waking this thread): under load its entry is taken for a new
    message within milliseconds, which is written over it. What is still
    kept SWEEP seconds later is emptied (truncated) here, so a delivered message
    does not stay on disk. A larger one is emptied at once. An entry is in trash/
    once it is delivered: whatever is still there at the next start is deleted then.
    """

    NAME = "spool-remove"
    REUSE = 256
    REUSE_BYTES = 1 << 16
    SWEEP = 0.5

    def __init__(self) -> None:
        super().__init__()
        self._empty: collections.deque[Path] = collections.deque()
        self._full: dict[Path, float] = {}
        """Kept entries not emptied yet, and when each was kept (monotonic seconds)."""
        self._sweeping = False
        self._taking = threading.Lock()
        """Held while an entry is taken, and while a kept one is emptied: a truncate
        must never reach a file that already holds the next message."""

    def remove(self, entry: Path) -> None:
        self.submit(entry)

    def keep(self, entry: Path, size: int) -> bool:
        """Keep a delivered entry of `size` bytes for reuse as it is, if it is small and
        there is room; False: `remove` it."""
        if size > self.REUSE_BYTES or len(self._empty) >= self.REUSE:
            return False
        self._full[entry] = time.monotonic()
        self._empty.append(entry)
        if not self._sweeping:
            self._sweeping = True
            self.submit(_SWEEP)
        return True

    def take(self) -> Path | None:
        """An entry in trash/ to write a new message into, if there is one."""
        with self._taking:
            try:
                entry = self._empty.pop()
            except IndexError:
                return None
            self._full.pop(entry, None)
        return entry

    def handle(self, batch: list[Path]) -> None:
        for entry in batch:
            if entry is _SWEEP:
                self._sweep()
            elif len(self._empty) >= self.REUSE or not _emptied(entry):
                _remove_entry(entry)
            else:
                self._empty.append(entry)

    def _sweep(self) -> None:
        """Empty what has been kept SWEEP seconds; what was kept since gets a sweep of
        its own, behind the deletions handed over meanwhile."""
        oldest = min(list(self._full.values()), default=None)
        if oldest is not None:
            time.sleep(max(0.0, oldest + self.SWEEP - time.monotonic()))
        due = time.monotonic() - self.SWEEP
        for entry, kept in list(self._full.items()):
            if kept <= due:
                with self._taking:
                    if self._full.pop(entry, None) is not None:  # else taken meanwhile
                        _emptied(entry)
        self._sweeping = False
        if self._full:
            self._sweeping = True
            self.submit(_SWEEP)


def _emptied(entry: Path) -> bool:
    """Truncate a delivered entry's files; False when it is not shaped like one."""
    try:
        os.truncate(entry / MESSAGE, 0)
        os.truncate(entry / ENVELOPE, 0)
    except OSError:
        return False
    return True


def _remove_entry(entry: Path) -> None:
    try:  # the files a finished entry has; anything else there: the slow way
        os.unlink(entry / MESSAGE)
        os.unlink(entry / ENVELOPE)
        os.rmdir(entry)
    except OSError:
        shutil.rmtree(entry, ignore_errors=True)


@dataclass
class Recovery:
    """What start-up found: entries put back, dead after too many crashes, removed, quarantined."""

    requeued: list[str] = field(default_factory=list)
    crashed_out: list[str] = field(default_factory=list)
    removed_incoming: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._committer = _GroupCommit(self)
        self._remover = _Remover()
        self._writer = spool_process.Writer()
        self._writer_failing = False

    def _dir(self, place: str) -> Path:
        return self.root / place

    def open(self) -> None:
        """Create the directories and prove we can write there. Raises SpoolError."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in _DIRS:
                (self.root / name).mkdir(exist_ok=True, mode=0o700)
            probe = self._dir("incoming") / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SpoolError(
                f"the spool directory {self.root} is not usable: {e.strerror}; "
                "make it writable by the relay's user or set state_dir"
            ) from None

    # --- accepting -------------------------------------------------------------------

    def store(self, envelope: Envelope, data: bytes) -> None:
        """Make the message durable in queue/. Raises SpoolError (nothing is left behind)."""
        (error,) = self.store_batch([(envelope, data)])
        if error is not None:
            raise error

    async def commit(self, envelope: Envelope, data: Content) -> None:
        """`store` from the event loop, sharing disk round trips with concurrent messages."""
        await self._committer.call((envelope, data))

    def store_batch(self, items: list[tuple[Envelope, Content]]) -> list[SpoolError | None]:
        """Write, fsync, rename into queue/, fsync queue/ once; one result per message.
        In this thread (`commit` has the writer process do it)."""
        return self._store_here(self._requests(items))

    def _store_here(self, requests: list[spool_process.Request]) -> list[SpoolError | None]:
        return self._results(spool_writer.store(
            spool_writer.Parts(spool_process.data_of(requests)), *self._places(),
            spool_process.items_of(requests)))

    def store_in_writer(self, items: list[tuple[Envelope, Content]]) -> list[SpoolError | None]:
        """`store_batch` by the writer process; should it stop, whatever it did not
        finish is done here."""
        requests = self._requests(items)
        try:
            results = self._results(self._writer.store(*self._places(), requests))
            self._writer_failing = False
            return results
        except spool_process.WriterGone as gone:
            self._writer_gone(gone)
        return [self._finish_store(*request) for request in requests]

    def _writer_gone(self, gone: spool_process.WriterGone) -> None:
        if not self._writer_failing:  # once, not for each batch while it cannot start
            log.warning("%s; the relay writes the messages itself until a new one runs", gone)
        self._writer_failing = True

    def _finish_store(self, queue_id: str, reuse: str, env: bytes,
                      content: Sequence[bytes | memoryview]) -> SpoolError | None:
        """After the writer stopped: the message is queued and synced, or stored anew."""
        incoming, queue, _ = self._places()
        if os.path.isdir(os.path.join(queue, queue_id)):
            try:
                spool_writer.fsync_dir(incoming)
                spool_writer.fsync_dir(queue)
                return None
            except OSError as e:
                return SpoolError(f"cannot sync the spool directory: {e.strerror}")
        shutil.rmtree(os.path.join(incoming, queue_id), ignore_errors=True)
        if reuse and os.path.isdir(reuse):
            self._remover.remove(Path(reuse))  # taken for it, not written over
        (error,) = self._store_here([(queue_id, "", env, content)])
        return error

    def _requests(self, items: list[tuple[Envelope, Content]]) -> list[spool_process.Request]:
        """Each message with an emptied delivered entry to write it over, if one is kept."""
        requests: list[spool_process.Request] = []
        for env, data in items:
            reuse = self._remover.take()
            parts: list[bytes | memoryview] = [data] if isinstance(data, bytes) else data
            requests.append((env.id, str(reuse) if reuse is not None else "", env.to_json(),
                             parts))
        return requests

    def _places(self) -> tuple[str, str, str]:
        return str(self._dir("incoming")), str(self._dir("queue")), str(self._dir("trash"))

    @staticmethod
    def _results(answers: list[str | None]) -> list[SpoolError | None]:
        return [None if answer is None else SpoolError(answer) for answer in answers]

    def start_writer(self) -> None:
        """Start the writer process now rather than at the first `commit`; should it not
        start, the relay writes the messages itself (and says so)."""
        try:
            self._writer.start()
        except spool_process.WriterGone as gone:
            self._writer_gone(gone)

    def close(self) -> None:
        """Stop the writer process (a later `commit` starts it again)."""
        self._writer.close()

    @property
    def writer_pid(self) -> int | None:
        return self._writer.pid

    # --- delivering ------------------------------------------------------------------

    def claim(self, queue_id: str, src: Place = "queue", dst: Place = "active") -> Envelope | None:
        """Take an entry by renaming it; None if someone else took or deleted it.

        A damaged entry raises DamagedEntry (in `dst`, for quarantine). When the system
        refuses to read it (an I/O error, permissions, no file descriptor left: nothing
        says the entry is damaged) it goes back to `src` and SpoolError says why."""
        entry = self._dir(src) / queue_id
        try:
            os.rename(entry, self._dir(dst) / queue_id)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SpoolError(e.errno, e.strerror, str(entry)) from e
        try:
            return self._read(queue_id, dst, system_errors=True)
        except FileNotFoundError:
            return None
        except SpoolError:
            raise
        except OSError as e:  # a system error while reading: untaken, not damaged
            with contextlib.suppress(OSError):
                os.rename(self._dir(dst) / queue_id, entry)
            raise SpoolError(e.errno, e.strerror, str(entry / os.fsdecode(e.filename or ""))
                             ) from e

    def message_path(self, queue_id: str, place: Place = "active") -> Path:
        return self._dir(place) / queue_id / MESSAGE

    def read(self, queue_id: str, place: Place) -> Envelope:
        return self._read(queue_id, place)

    def _read(self, queue_id: str, place: Place, system_errors: bool = False) -> Envelope:
        """The envelope of an entry, read from one directory whatever moves meanwhile.

        The entry's directory is opened once (a symlink is not followed) and its envelope
        and message are looked at relative to that descriptor: an entry that is claimed,
        put back or delivered while it is read is read whole, or not found; never taken
        for damaged. FileNotFoundError: no entry there (any more); DamagedEntry: the
        entry that is there cannot be read back. With `system_errors`, an error that
        says nothing about the entry (_SYSTEM_ERRORS) is raised as it is instead."""
        entry = self._dir(place) / queue_id
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise
        except OSError as e:  # a symlink or a file where an entry belongs, or unreadable
            if system_errors and e.errno in _SYSTEM_ERRORS:
                raise
            what = ("a symbolic link, not an entry (not followed)" if os.path.islink(entry)
                    else e.strerror)
            raise DamagedEntry(f"{entry}: {what}") from None
        try:
            found = _read_entry(fd, queue_id, system_errors)
            if isinstance(found, Envelope):
                return found
            if not _still_at(fd, entry):  # delivered, its directory emptied or reused
                raise FileNotFoundError(errno.ENOENT, "moved on while it was read", str(entry))
            raise DamagedEntry(f"{entry}{found}")
        finally:
            os.close(fd)

    def update(self, envelope: Envelope, place: Place = "active") -> None:
        """Replace the envelope atomically (per-recipient states, attempts)."""
        entry = self._dir(place) / envelope.id
        tmp = entry / (ENVELOPE + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _write_file(tmp, envelope.to_json())
        os.replace(tmp, entry / ENVELOPE)

    def release(self, envelope: Envelope, src: Place = "active", dst: Place = "queue") -> None:
        """Save the envelope and move the entry on (back to queue/, or into dead/)."""
        self.update(envelope, src)
        os.rename(self._dir(src) / envelope.id, self._dir(dst) / envelope.id)
        spool_writer.fsync_dir(self._dir(dst))

    def put_back(self, queue_id: str, src: Place = "active") -> None:
        """Return a claimed entry to the queue unchanged: a rename, which needs no free space."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._dir(src) / queue_id, self._dir("queue") / queue_id)

    def finish(self, queue_id: str, place: Place = "active", size: int | None = None) -> None:
        """The upstream has the message (of `size` bytes, when known): remove it."""
        trash = self._dir("trash") / queue_id
        os.rename(self._dir(place) / queue_id, trash)
        if size is None or not self._remover.keep(trash, size):
            self._remover.remove(trash)

    def removed(self, timeout: float = 10.0) -> bool:
        """True once every finished entry is emptied or deleted (it happens in a thread)."""
        return self._remover.wait(timeout)

    def quarantine(self, queue_id: str, place: str, reason: str) -> None:
        """Move a damaged entry (a directory, or a stray file) aside; never raises."""
        src = self._dir(place) / queue_id
        dst = self._dir("quarantine") / queue_id
        if dst.exists():
            dst = dst.with_name(f"{queue_id}.{time.time_ns()}")
        try:
            if src.is_dir() and not src.is_symlink():
                with contextlib.suppress(OSError):  # the reason arrives with the entry
                    (src / "REASON").write_text(reason + "\n")
                os.rename(src, dst)
            else:
                dst.mkdir(mode=0o700)
                os.rename(src, dst / queue_id)
            if not (dst / "REASON").is_file():
                (dst / "REASON").write_text(reason + "\n")
        except OSError:
            pass  # gone meanwhile, or the disk refuses: the next start finds it again

    def quarantined(self, queue_id: str) -> str | None:
        """Why an entry was moved to quarantine/ (its REASON), or None if it was not."""
        found = sorted(p for p in self._dir("quarantine").glob(f"{queue_id}*")
                       if p.name == queue_id or p.name.startswith(f"{queue_id}."))
        if not found:
            return None
        try:
            return (found[-1] / "REASON").read_text(errors="replace").strip()
        except OSError:
            return f"no reason recorded in {found[-1]}"

    # --- looking ---------------------------------------------------------------------

    def ids(self, place: Place) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._dir(place)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def scan(self, place: Place) -> Iterator[tuple[str, Envelope | DamagedEntry]]:
        """Every entry in a place, or the DamagedEntry explaining why it cannot be read."""
        for queue_id in self.ids(place):
            try:
                yield queue_id, self.read(queue_id, place)
            except DamagedEntry as e:
                yield queue_id, e
            except FileNotFoundError:
                continue  # claimed or removed while we looked

    def find(self, queue_id: str) -> tuple[Place, Envelope] | None:
        for attempt in range(10):
            try:
                return self._find_once(queue_id)
            except FileNotFoundError:  # it moved while we read it (claimed, put back,
                if attempt == 9:       # delivered): look again from queue/
                    raise
        return None

    def _find_once(self, queue_id: str) -> tuple[Place, Envelope] | None:
        places: tuple[Place, ...] = ("queue", "active", "edit", "dead")
        for place in places:
            if (self._dir(place) / queue_id).is_dir():
                return place, self.read(queue_id, place)
        return None

    def count(self, place: Place) -> int:
        return len(self.ids(place))

    # --- start-up ----------------------------------------------------------------------

    def recover(self, max_crashes: int, backoff: Callable[[int], float] | None = None
                ) -> Recovery:
        """Put the spool in order after any stop, kill -9 included.

        An entry whose delivery was interrupted waits `backoff(crashes)` seconds before
        it is tried again, so a message in flight at every kill is not always first.
        """
        report = Recovery()
        for name in os.listdir(self._dir("incoming")):
            shutil.rmtree(self._dir("incoming") / name, ignore_errors=True)
            report.removed_incoming += 1
        for name in os.listdir(self._dir("trash")):
            shutil.rmtree(self._dir("trash") / name, ignore_errors=True)
        places: tuple[Place, ...] = ("edit", "active")
        for place in places:
            for queue_id, env in list(self.scan(place)):
                if isinstance(env, DamagedEntry):
                    self.quarantine(queue_id, place, str(env))
                    report.quarantined.append((queue_id, str(env)))
                    continue
                if place == "active":
                    env.crashes += 1
                if env.crashes >= max_crashes:
                    env.dead_reason = (f"delivery was interrupted {env.crashes} times "
                                       "(the relay stopped or crashed while sending it)")
                    self.release(env, place, "dead")
                    report.crashed_out.append(queue_id)
                else:
                    if place == "active" and backoff is not None:
                        env.next_attempt = time.time() + backoff(env.crashes)
                    self.release(env, place, "queue")
                    report.requeued.append(queue_id)
        return report
