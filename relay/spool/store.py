"""The spool: every accepted message on disk until the upstream has it.

An entry is one file (`relay.spool.files` gives its format): a header holding the
envelope (sender, recipients and their states, attempts) as it was at the commit,
then the message (the client's bytes; the rewrite is applied when it is sent,
`Envelope.as_received`). A later envelope is saved atomically in envelopes/ID
and read instead of the header's; the entry's file is never written again.
Entries of the earlier layout (a directory holding `message` and `envelope.json`)
are read, moved and removed the same way. Where the entry sits is its state:

    incoming/ID    being received or committed; removed at start-up (the client
                   never got 250) and when a reception is abandoned
    queue/ID       waiting for delivery (queued, deferred or held)
    active/ID      claimed by a delivery; put back at start-up (a crash), counted
    edit/ID        claimed by `queue retry`; put back at start-up
    dead/ID        dead letter, with the reason in the envelope
    quarantine/ID  damaged entries moved aside (with their saved envelope), never deleted
    trash/ID       delivered: being deleted (in a thread); all deleted at start-up
    envelopes/ID   the envelope saved since the commit, if it changed; ID.MARK the
                   marks of `mark_once`; removed with the entry (at start-up, those
                   whose entry is gone)

A message is written into incoming/ as it arrives (`Incoming`), made durable with
one fdatasync and renamed into queue/ by `Spool.commit` (whose docstring gives the
argument): only then does the client get 250. A delivery
claims an entry by renaming it into active/, so two workers (or the daemon and
the command line) never hold the same entry. Nothing is removed before the
upstream has accepted it. Directories are 0700 and files 0600; an entry that is a
symbolic link, or whose saved envelope (or, in the earlier layout, message or
envelope) is one, is quarantined when it is claimed or recovered, never followed
(its target is neither sent nor truncated).
`read` takes an entry from one open file (or directory), so an entry that moves
meanwhile is read whole or not found, never called damaged. Every method here
waits for the disk: call it from a thread (the scheduler does, once to claim and
read a message, once to finish it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.errors import DamagedEntry, SpoolError
from relay.spool import files as spool_file
from relay.spool import state
from relay.spool.batches import Worker
from relay.spool.envelope import Envelope as Envelope
from relay.spool.envelope import Recipient as Recipient
from relay.spool.envelope import RecipientState as RecipientState
from relay.spool.envelope import new_queue_id as new_queue_id
from relay.spool.files import ENVELOPE, MESSAGE, fsync_dir
from relay.spool.files import read_regular as read_regular
from relay.spool.incoming import GroupCommit, commit_one
from relay.spool.incoming import Incoming as Incoming

log = logging.getLogger("relay.spool")

Place = Literal["queue", "active", "dead", "edit"]
ENVELOPES = "envelopes"
MARKS = ("notified",)
"""What `mark_once` records beside an entry (the dead-letter report was queued)."""
_DIRS = ("incoming", "queue", "active", "edit", "dead", "quarantine", "trash", ENVELOPES)


def _write_reason(entry: Path, reason: str) -> None:
    """The REASON file of a quarantined entry (private, never through a link)."""
    fd = state.open_private(entry / "REASON", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, (reason + "\n").encode("utf-8", "replace"))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Claimed:
    """An entry as `Spool.take` read it: its envelope, the file holding its message and
    where the message begins in it (after the header), and the message's bytes when
    they were asked for."""

    envelope: Envelope
    path: Path
    start: int
    data: bytes | None = None


INLINE_BYTES = 1 << 20
"""Messages up to this size are read whole when they are claimed (in the same thread),
larger ones a chunk at a time as they are sent."""


class _Remover(Worker[Callable[[], None]]):
    """Removes delivered entries and discarded receptions, so no session or delivery
    waits for it."""

    NAME = "spool-remove"

    def handle(self, batch: list[Callable[[], None]]) -> None:
        for job in batch:
            job()


def _remove_entry(entry: Path, latest: Path) -> None:
    """Remove a finished entry (a file, or a directory of the earlier layout), then the
    envelope saved beside it and its marks."""
    try:
        os.unlink(entry)
    except IsADirectoryError:
        try:  # the files an entry of the earlier layout has; anything else: the slow way
            os.unlink(entry / MESSAGE)
            os.unlink(entry / ENVELOPE)
            os.rmdir(entry)
        except OSError:
            shutil.rmtree(entry, ignore_errors=True)
    except OSError:
        pass
    for path in (latest, *(latest.with_name(f"{latest.name}.{mark}") for mark in MARKS)):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _remove_tree(path: Path) -> None:
    """Remove a file, or a directory tree; a symbolic link is removed itself, its target
    untouched."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Recovery:
    """What start-up found: entries put back, dead after too many crashes, removed, quarantined."""

    requeued: list[str] = field(default_factory=list)
    crashed_out: list[str] = field(default_factory=list)
    removed_incoming: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)


class Spool:
    WRITERS = 8
    """Threads writing out large messages as they are received, and syncing the
    messages of a commit side by side."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._committer = GroupCommit(self._commit_batch)
        self._remover = _Remover()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _dir(self, place: str) -> Path:
        return self.root / place

    def open(self) -> None:
        """Create the directories (0700, never through a symbolic link), make their names
        durable (fsync of the spool and of its parent) and prove we can write there.
        Raises SpoolError."""
        try:
            state.private_dir(self.root)
            for name in _DIRS:
                state.private_dir(self.root / name)
            # queue/ and the others are durable in the spool, and the spool in its
            # parent, only once those are fsynced: private_dir does it for what it
            # makes, this for what a run stopped before its sync may have left.
            fsync_dir(self.root)
            fsync_dir(self.root.parent)
            probe = self._dir("incoming") / f".probe-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):  # a power cut can leave one made
                probe.unlink()                            # with our pid (pids repeat at boot)
            os.close(state.open_private(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            probe.unlink()
        except OSError as e:
            raise SpoolError(
                f"the spool directory {self.root} is not usable: {e.strerror}; "
                "make it writable by the relay's user or set state_dir"
            ) from None

    # --- accepting -------------------------------------------------------------------

    def receive(self, queue_id: str) -> Incoming:
        """A new message, to be written into with `Incoming.write` and then `commit`ted."""
        return Incoming(self.root, queue_id, self._writes, self._remover)

    async def commit(self, envelope: Envelope, message: Incoming) -> None:
        """Make a received message durable in queue/ under `envelope`. Raises SpoolError
        (and nothing is left behind).

        The durability argument. The message and its envelope are one file,
        incoming/ID: the header (the envelope) is written, the message's last bytes
        follow, and one fdatasync makes all of its bytes and its length durable (the
        file's data, and the metadata needed to read it back). Only then is it renamed
        into queue/ID, and queue/ is fsynced: the new name is durable. Only then does
        this return, and the client get 250. A crash (or a power loss that drops every
        unsynced write) before the rename leaves the file in incoming/, which start-up
        removes: the client had no 250 and sends again. A crash after the rename but
        before queue/'s fsync returned leaves it in queue/ complete (its bytes were
        synced before its name moved) or in incoming/: delivered, or sent again by the
        client; never half a message under a name in queue/. A file system without a
        journal may keep the old name in incoming/ as well: start-up removes that name,
        the entry in queue/ stays. So: at least once, never zero times.

        Concurrent commits share queue/'s fsync (one thread takes them in batches, and
        the fdatasyncs of a batch run side by side); nothing syncs a whole file system.
        """
        await self._committer.call((envelope, message))

    def store(self, envelope: Envelope, data: bytes) -> None:
        """`commit` of a message already in memory, in this thread (which waits for the disk)."""
        (error,) = self.store_batch([(envelope, data)])
        if error is not None:
            raise error

    def store_batch(self, items: list[tuple[Envelope, bytes]]) -> list[SpoolError | None]:
        """`store` for several messages, sharing the directory sync; one result each."""
        batch = []
        for envelope, data in items:
            message = self.receive(envelope.id)
            message._pieces, message.size = [data], len(data)
            batch.append((envelope, message))
        return self._commit_batch(batch)

    def _commit_batch(self, items: list[tuple[Envelope, Incoming]]) -> list[SpoolError | None]:
        # The messages' own syncs run side by side: a file system that journals
        # (ext4, xfs) then makes them durable in one commit of its journal.
        if len(items) == 1:
            errors = [commit_one(*items[0])]
        else:
            errors = list(self._writes().map(lambda item: commit_one(*item), items))
        committed = [i for i, error in enumerate(errors) if error is None]
        if committed:
            try:
                fsync_dir(self._dir("queue"))
            except OSError as e:  # in queue/ but perhaps not durable: the client retries
                for i in committed:
                    errors[i] = SpoolError(f"cannot sync the spool directory: {e.strerror}")
        return errors

    def _writes(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that write large messages out while they are received."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.WRITERS, thread_name_prefix="spool-write")
            return self._executor

    def close(self) -> None:
        """Wait for writes in progress and stop their threads (a later one starts them again)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # --- delivering ------------------------------------------------------------------

    def claim(self, queue_id: str, src: Place = "queue", dst: Place = "active") -> Envelope | None:
        """Take an entry by renaming it; None if someone else took or deleted it.

        A damaged entry raises DamagedEntry (in `dst`, for quarantine). When the system
        refuses to read it (an I/O error, permissions, no file descriptor left: nothing
        says the entry is damaged) it goes back to `src` and SpoolError says why."""
        taken = self.take(queue_id, src=src, dst=dst)
        return None if taken is None else taken.envelope

    def take(self, queue_id: str, inline: int = -1, src: Place = "queue",
             dst: Place = "active") -> Claimed | None:
        """`claim`, and where its message is; with its bytes too when the message is not
        larger than `inline` (read through the same open file, in this thread)."""
        entry = self._dir(src) / queue_id
        try:
            os.rename(entry, self._dir(dst) / queue_id)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SpoolError(e.errno, e.strerror, str(entry)) from e
        try:
            self._not_linked(self._dir(dst) / queue_id)
            return self._read(queue_id, dst, system_errors=True, inline=inline)
        except FileNotFoundError:
            return None
        except SpoolError:
            raise
        except OSError as e:  # a system error while reading: untaken, not damaged
            with contextlib.suppress(OSError):
                os.rename(self._dir(dst) / queue_id, entry)
            raise SpoolError(e.errno, e.strerror, str(entry / os.fsdecode(e.filename or ""))
                             ) from e

    def _not_linked(self, entry: Path) -> None:
        paths = [entry, self._latest(entry.name)]
        if os.path.isdir(entry) and not os.path.islink(entry):
            paths += [entry / MESSAGE, entry / ENVELOPE]
        for path in paths:
            try:
                linked = stat.S_ISLNK(os.lstat(path).st_mode)
            except FileNotFoundError:
                if path is entry:
                    raise
                continue  # `read` says what is missing
            if linked:
                raise DamagedEntry(f"{path}: is a symbolic link (not followed; its target "
                                   f"{os.readlink(path)} is left untouched)")

    def _latest(self, queue_id: str) -> Path:
        """Where the envelope of an entry is saved once it changed after the commit."""
        return self._dir(ENVELOPES) / queue_id

    def message_path(self, queue_id: str, place: Place = "active") -> Path:
        """The file that holds the entry's message: the entry itself, or for an entry of
        the earlier layout its `message` (`message_start` says where the message begins)."""
        entry = self._dir(place) / queue_id
        return entry / MESSAGE if os.path.isdir(entry) and not os.path.islink(entry) else entry

    @staticmethod
    def message_start(path: Path) -> int:
        """Where the message begins in `message_path`'s file. OSError, or DamagedEntry when
        the file is no entry."""
        if path.name == MESSAGE:
            return 0
        fd = spool_file.open_regular(path)
        try:
            return spool_file.message_start(fd)
        except spool_file.BadHeader as e:
            raise DamagedEntry(f"{path}: not a spool entry: {e}") from None
        finally:
            os.close(fd)

    def read_message(self, queue_id: str, place: Place = "active") -> bytes:
        """The message's bytes as the client sent them (without the entry's header)."""
        path = self.message_path(queue_id, place)
        fd = spool_file.open_regular(path)
        try:
            if path.name == MESSAGE:
                return spool_file.read_fd(fd)
            return spool_file.read_fd(fd, spool_file.message_start(fd))
        except spool_file.BadHeader as e:
            raise DamagedEntry(f"{path}: not a spool entry: {e}") from None
        finally:
            os.close(fd)

    def read(self, queue_id: str, place: Place) -> Envelope:
        return self._read(queue_id, place).envelope

    def _read(self, queue_id: str, place: Place, system_errors: bool = False,
              inline: int = -1) -> Claimed:
        """The envelope of an entry, read from one open file whatever moves meanwhile.

        The entry (a file, or a directory of the earlier layout) is opened once (a symlink
        is not followed) and read through that descriptor; then the envelope saved since
        the commit, if any, is read, and one that is absent is confirmed by the entry still
        being there: an entry that is claimed, put back or delivered while it is read is
        read whole, or not found; never taken for damaged. FileNotFoundError: no entry
        there (any more); DamagedEntry: the entry that is there cannot be read back. With
        `system_errors`, an error that says nothing about the entry (_SYSTEM_ERRORS) is
        raised as it is instead. With `inline` >= 0, a message up to that size is read."""
        entry = self._dir(place) / queue_id
        try:
            mode = os.lstat(entry).st_mode
        except FileNotFoundError:
            raise
        except OSError as e:
            spool_file.system_error(e, system_errors)
            raise DamagedEntry(f"{entry}: {e.strerror}") from None
        if stat.S_ISLNK(mode):
            raise DamagedEntry(f"{entry}: a symbolic link, not an entry (not followed)")
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # never opened (a FIFO blocks)
            raise DamagedEntry(f"{entry}: not a spool entry (neither a file nor a directory)")
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as e:  # unreadable, or changed into a symlink meanwhile
            spool_file.system_error(e, system_errors)
            what = ("a symbolic link, not an entry (not followed)" if os.path.islink(entry)
                    else e.strerror)
            raise DamagedEntry(f"{entry}: {what}") from None
        try:
            mode = os.fstat(fd).st_mode
            found: Envelope | str
            if stat.S_ISDIR(mode):
                found = spool_file.read_old(fd, queue_id, system_errors)
                path, start = entry / MESSAGE, 0
            elif stat.S_ISREG(mode):
                read = spool_file.read_file(fd, queue_id, system_errors)
                found, start = read if isinstance(read, tuple) else (read, 0)
                path = entry
            else:
                found = ": not a spool entry (neither a file nor a directory)"
            if isinstance(found, Envelope):
                latest = spool_file.read_latest(self._latest(queue_id), queue_id, system_errors)
                if latest is None and not spool_file.still_at(fd, entry):
                    raise FileNotFoundError(errno.ENOENT, "moved on while it was read",
                                            str(entry))
                if latest is None or isinstance(latest, Envelope):
                    env = found if latest is None else latest
                    data = None
                    if 0 <= env.size <= inline:
                        data = spool_file.read_message(fd, start, mode, system_errors, entry)
                    return Claimed(env, path, start, data)
                found = f": its saved envelope {latest}"
            if not spool_file.still_at(fd, entry):  # delivered, or moved on
                raise FileNotFoundError(errno.ENOENT, "moved on while it was read", str(entry))
            raise DamagedEntry(f"{entry}{found}")
        finally:
            os.close(fd)

    def update(self, envelope: Envelope, place: Place = "active") -> None:
        """Save the envelope (per-recipient states, attempts) of an entry this process has
        claimed (in `place`): atomically and durably, in a file beside the spool's places,
        which `read` takes over the header's."""
        if not os.path.lexists(self._dir(place) / envelope.id):
            raise FileNotFoundError(errno.ENOENT, "no such entry", str(self._dir(place) /
                                                                        envelope.id))
        state.write_atomically(self._latest(envelope.id), envelope.to_json())

    def release(self, envelope: Envelope, src: Place = "active", dst: Place = "queue") -> None:
        """Save the envelope and move the entry on (back to queue/, or into dead/)."""
        self.update(envelope, src)
        os.rename(self._dir(src) / envelope.id, self._dir(dst) / envelope.id)
        fsync_dir(self._dir(dst))

    def put_back(self, queue_id: str, src: Place = "active") -> None:
        """Return a claimed entry to the queue unchanged: a rename, which needs no free space."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._dir(src) / queue_id, self._dir("queue") / queue_id)

    def finish(self, queue_id: str, place: Place = "active", size: int | None = None) -> None:
        """The upstream has the message (of `size` bytes, when known): remove it."""
        trash = self._dir("trash") / queue_id
        os.rename(self._dir(place) / queue_id, trash)
        self._remover.submit(functools.partial(_remove_entry, trash, self._latest(queue_id)))

    def removed(self, timeout: float = 10.0) -> bool:
        """True once every finished entry is deleted (it happens in a thread)."""
        return self._remover.wait(timeout)

    def quarantine(self, queue_id: str, place: str, reason: str) -> None:
        """Move a damaged entry (a file, a directory, or anything else) aside, with the
        envelope saved beside it if any; never raises."""
        src = self._dir(place) / queue_id
        dst = self._dir("quarantine") / queue_id
        if dst.exists():
            dst = dst.with_name(f"{queue_id}.{time.time_ns()}")
        try:
            if src.is_dir() and not src.is_symlink():
                with contextlib.suppress(OSError):  # the reason arrives with the entry
                    _write_reason(src, reason)
                os.rename(src, dst)
            else:
                dst.mkdir(mode=0o700)
                os.rename(src, dst / queue_id)
            if not (dst / "REASON").is_file():
                _write_reason(dst, reason)
            with contextlib.suppress(FileNotFoundError):
                os.rename(self._latest(queue_id), dst / f"{ENVELOPES}.{queue_id}")
        except OSError:
            pass  # gone meanwhile, or the disk refuses: the next start finds it again

    def mark_once(self, queue_id: str, place: Place, mark: str) -> bool:
        """Record `mark` (one of MARKS) for an entry in `place`: True the first time,
        False when it was recorded before or the entry is not there. Removed with it."""
        if mark not in MARKS:
            raise ValueError(f"unknown mark {mark!r}")
        if not os.path.lexists(self._dir(place) / queue_id):
            return False
        try:
            os.close(state.open_private(self._dir(ENVELOPES) / f"{queue_id}.{mark}",
                                        os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

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
            if os.path.lexists(self._dir(place) / queue_id):
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
            _remove_tree(self._dir("incoming") / name)
            report.removed_incoming += 1
        for name in os.listdir(self._dir("trash")):
            _remove_tree(self._dir("trash") / name)
            with contextlib.suppress(OSError):
                os.unlink(self._latest(name))
        places: tuple[Place, ...] = ("edit", "active")
        for place in places:
            for queue_id, env in list(self.scan(place)):
                try:  # a planted symbolic link: quarantined, its target never written
                    self._not_linked(self._dir(place) / queue_id)
                except DamagedEntry as e:
                    env = e
                except FileNotFoundError:
                    continue
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
        self._remove_strays()
        return report

    def _remove_strays(self) -> None:
        """Saved envelopes and marks whose entry is gone (delivered before a crash ended
        their removal), and temporary files of writes a crash interrupted."""
        places: tuple[Place, ...] = ("queue", "active", "edit", "dead")
        for name in os.listdir(self._dir(ENVELOPES)):
            queue_id = name.split(".")[0] if not name.startswith(".") else ""
            if queue_id and any(os.path.lexists(self._dir(p) / queue_id) for p in places):
                continue
            _remove_tree(self._dir(ENVELOPES) / name)
