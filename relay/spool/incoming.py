"""The commit path: a message as it is received and made durable in the spool.

`Incoming` streams the message into incoming/ID; `GroupCommit` is the thread that
makes messages durable in batches; `Intake` (the spool's accepting side, behind
`Spool.receive`, `Spool.commit` and `Spool.store`) hands a message to it and returns
only when the message is durable, and then the client gets its 250. No settings, no
network code.

The durability argument. The message and its envelope are one file, incoming/ID:
the header (the envelope) is written, the message's last bytes follow, and one
fdatasync makes all of its bytes and its length durable (the file's data, and the
metadata needed to read it back). Only then is it renamed into queue/ID, and
queue/ is fsynced: the new name is durable. The spool's directories themselves
are durable in their parents (`state.private_dir` fsyncs the parent of each it
makes, `Spool.open` the spool and its parent at every start). A crash, or a power
cut that drops every unsynced write, before the rename leaves the file in
incoming/, which start-up removes: the client had no 250 and sends again. A cut
after the rename but before queue/'s fsync returned leaves it in queue/ complete
(its bytes were synced before its name moved) or in incoming/: delivered, or sent
again by the client; never half a message under a name in queue/. A file system
whose rename is not atomic may keep the old name in incoming/ as well: start-up
removes that name, the entry in queue/ stays. So: at least once, never zero times.
tests/spool/test_powerloss_*.py prove it on a file system that drops whatever was
not synced (and catch a missing fsync).

Concurrent commits share queue/'s fsync: one thread takes them in batches, and the
fdatasyncs of a batch run side by side; nothing syncs a whole file system.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from relay.errors import SpoolError
from relay.spool import files as spool_file
from relay.spool.batches import AwaitedWorker
from relay.spool.envelope import Envelope
from relay.spool.files import fsync_dir
from relay.spool.removal import Remover


class Incoming:
    """A message being received into the file incoming/ID, as its bytes arrive.

    Up to BUFFER bytes are kept in memory: a small message is written by the group
    commit, header and message in one write, in the one thread hop that makes it
    durable. Beyond that, the file is created with room for the header (whose
    envelope is known only at the end), and what is buffered is written out in a
    thread and the session waits for it before it reads
    on, so a session holds at most about BUFFER bytes whatever the message's size.
    A write that fails is remembered, the entry removed, and what follows dropped:
    `Spool.commit` then fails with the cause. `discard` (client gone, too big,
    shutdown) removes whatever was written. Only the event loop calls `write` and
    `discard`; the file system calls run in the spool's threads.
    """

    BUFFER = 1 << 17
    HEAD = 1 << 16

    def __init__(self, root: Path, queue_id: str,
                 writes: Callable[[], concurrent.futures.ThreadPoolExecutor],
                 remover: Remover) -> None:
        self.queue_id = queue_id
        self.size = 0
        self.head = bytearray()
        """The message's first HEAD bytes: where the header block is, for the Subject."""
        self._path = root / "incoming" / queue_id
        self._queue = root / "queue"
        self._writes = writes
        self._remover = remover
        self._pieces: list[bytes | bytearray] = []
        self._buffered = 0
        self._fd: int | None = None
        self._made = False
        self._error: OSError | None = None
        self._writing: concurrent.futures.Future[None] | None = None
        """The last write handed to a thread."""
        self._discarded = False

    async def write(self, data: bytes | bytearray) -> None:
        """Take the next bytes of the message (they must not change afterwards)."""
        if not data or self._discarded:
            return
        self.size += len(data)
        if len(self.head) < self.HEAD:
            self.head += data[:self.HEAD - len(self.head)]
        if self._error is not None:
            return  # the entry is gone; the rest of the message is read and dropped
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered >= self.BUFFER:
            pieces, self._pieces, self._buffered = self._pieces, [], 0
            self._writing = self._writes().submit(self._spill, pieces)
            await asyncio.wrap_future(self._writing)

    def discard(self) -> None:
        """Remove what was written (in a thread, after a write still running)."""
        if self._discarded:
            return
        self._discarded = True
        self._pieces, self._buffered = [], 0
        if self._writing is not None:  # else nothing is on disk yet
            # Called at once when it is done, else by its thread when it finishes:
            # never while it still writes, even if the session's wait was cancelled.
            self._writing.add_done_callback(lambda _: self._remover.submit((self._remove, None)))

    # --- in a thread ---------------------------------------------------------------

    def _spill(self, pieces: list[bytes | bytearray]) -> None:
        if self._error is not None or self._discarded:
            return
        try:
            self._flush(pieces)
        except OSError as e:
            self._error = e
            self._remove()

    def _flush(self, pieces: list[bytes | bytearray]) -> None:
        if self._fd is None:
            self._fd = self._create()
            self._made = True
            spool_file.write_all(self._fd, spool_file.placeholder())
        for piece in pieces:
            spool_file.write_all(self._fd, piece)

    def _create(self) -> int:
        return os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)

    def _commit(self, envelope: bytes) -> None:
        """Write the header and what is left, make the file durable (one fdatasync), and
        rename it into queue/ (whose fsync, shared by the batch, is the caller's)."""
        if self._error is not None:
            raise self._error
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        if self._fd is None:  # all of it in memory: one write
            self._fd = self._create()
            self._made = True
            spool_file.write_all(self._fd, b"".join([spool_file.header(envelope), *pieces]))
        else:
            self._flush(pieces)
            head = spool_file.header(envelope, spool_file.RESERVED)
            if len(head) == spool_file.RESERVED:
                os.pwrite(self._fd, head, 0)
            else:
                self._fd = self._rewrite(head)
        os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self._path, self._queue / self.queue_id)
        self._made = False

    def _rewrite(self, head: bytes) -> int:
        """An envelope larger than the room kept for it: a new file with the header and
        the message copied after it, in place of the first (rare: thousands of recipients)."""
        assert self._fd is not None
        old, self._fd = self._fd, None
        size = os.fstat(old).st_size - spool_file.RESERVED
        bigger = self._path.with_name(self.queue_id + ".header")
        fd = os.open(bigger, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            spool_file.write_all(fd, head)
            offset = spool_file.RESERVED
            while offset < spool_file.RESERVED + size:
                chunk = os.pread(old, 1 << 20, offset)
                if not chunk:
                    break
                spool_file.write_all(fd, chunk)
                offset += len(chunk)
            os.rename(bigger, self._path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(bigger)
            self._fd = old
            raise
        os.close(old)
        return fd

    def _remove(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._made:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._made = False


class GroupCommit(AwaitedWorker[tuple["Envelope", Incoming], None]):
    """Makes concurrently received messages durable together, in one thread.

    Each message of a batch gets its header, is fdatasync'ed (the threads of
    `Intake.WRITERS` do this side by side: a journaling file system makes them durable
    in one commit of its journal) and renamed into queue/; then queue/ is fsynced
    once for the whole batch. No message is acknowledged before its own bytes and
    its name in queue/ are on disk.
    """

    MAX_BATCH = 64
    NAME = "spool-commit"

    def __init__(self, commit_batch: Callable[[list[tuple[Envelope, Incoming]]],
                                              list[SpoolError | None]]) -> None:
        super().__init__()
        self.commit_batch = commit_batch

    def results(self, args: list[tuple[Envelope, Incoming]]) -> list[Exception | None]:
        return [*self.commit_batch(args)]


def commit_one(envelope: Envelope, message: Incoming) -> SpoolError | None:
    try:
        message._commit(envelope.to_json())
    except (OSError, ValueError) as e:
        message._remove()
        cause = e.strerror if isinstance(e, OSError) else str(e)
        return SpoolError(f"cannot write the message to the spool: {cause}")
    return None


class Intake:
    """The spool's accepting side: receptions into incoming/, the group commit into
    queue/, and the threads that write large messages out while they arrive."""

    WRITERS = 8
    """Threads writing out large messages as they are received, and syncing the
    messages of a commit side by side."""

    def __init__(self, root: Path, remover: Remover) -> None:
        self.root = root
        self._remover = remover
        self._committer = GroupCommit(self.commit_batch)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def receive(self, queue_id: str) -> Incoming:
        return Incoming(self.root, queue_id, self._writes, self._remover)

    async def commit(self, envelope: Envelope, message: Incoming) -> None:
        await self._committer.call((envelope, message))

    def store_batch(self, items: list[tuple[Envelope, bytes]]) -> list[SpoolError | None]:
        batch = []
        for envelope, data in items:
            message = self.receive(envelope.id)
            message._pieces, message.size = [data], len(data)
            batch.append((envelope, message))
        return self.commit_batch(batch)

    def commit_batch(self, items: list[tuple[Envelope, Incoming]]) -> list[SpoolError | None]:
        """In this thread: commit each message, then one fsync of queue/ for all."""
        # The messages' own syncs run side by side: a file system that journals
        # (ext4, xfs) then makes them durable in one commit of its journal.
        if len(items) == 1:
            errors = [commit_one(*items[0])]
        else:
            errors = list(self._writes().map(lambda item: commit_one(*item), items))
        committed = [i for i, error in enumerate(errors) if error is None]
        if committed:
            try:
                fsync_dir(self.root / "queue")
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
