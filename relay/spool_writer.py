"""The spool's group commit in a process of its own.

The event loop hands each batch of received messages to this process in one
write and reads one answer: the process writes the files into incoming/, makes
them durable, renames them into queue/ and syncs the directories (`store`). Its
dozens of file system calls per message then no longer take turns with the event
loop for the interpreter lock.

Run as a script (`python -I -S spool_writer.py FD`), so it imports only the
standard library, and little of it (it is a second interpreter beside the relay's,
about 10 MiB resident): it starts in a few milliseconds and needs no installed
package. The relay's end is relay/spool_process.py; `Spool.store_batch` runs the
same code in the relay's own process.

A request: 4 bytes of header length, the header (marshal: the incoming, queue
and trash directories, then for each message its id, the emptied entry to write
it over or "", the envelope's length and the message's length), then each
message's envelope and message bytes. The answer: 4 bytes of length and a
marshal list, per message None or the reason it could not be stored.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import signal
import struct
import sys
from collections.abc import Callable, Sequence

SYNCFS_BATCH = 4
"""From this many messages in one batch, one syncfs(2) replaces an fsync per file."""
INLINE = 1 << 20
"""A request whose data fits in this many bytes is read in one piece."""
_CHUNK = 1 << 18
_HEAD = struct.Struct("!I")
MESSAGE = "message"
ENVELOPE = "envelope.json"
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

Item = tuple[str, str, int, int]
"""queue id, emptied entry to write over ("" for none), envelope length, message length"""


_RELAY = 0
"""The relay's pid, in the writer process; 0 in the relay itself."""


def relay_alive() -> bool:
    return not _RELAY or os.getppid() == _RELAY


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(directory: str | os.PathLike[str]) -> bool:
    """Flush the whole file system holding `directory` (Linux); False when that failed."""
    if _LIBC is None or not hasattr(_LIBC, "syncfs"):
        return False
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bool(_LIBC.syncfs(fd) == 0)
    finally:
        os.close(fd)


Read = Callable[[memoryview], int]
"""Reads into the view what has come, at least one byte; 0 when the peer closed."""
Write = Callable[[memoryview], int]
"""Writes from the view what it can; how much."""


def recv_into(read: Read, view: memoryview) -> int:
    got = read(view)
    if not got:
        raise EOFError("the peer closed the connection")
    return got


def recv_exact(read: Read, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    while view:
        view = view[recv_into(read, view):]
    return buf


def send_frame(write: Write, payload: bytes, parts: Sequence[bytes | memoryview] = ()) -> None:
    """The length-prefixed `payload`, then `parts` as they are (no copy of large ones)."""
    for part in (_HEAD.pack(len(payload)) + payload, *parts):
        view = memoryview(part)
        while view:
            view = view[write(view):]


def recv_frame(read: Read) -> bytearray:
    (size,) = _HEAD.unpack(recv_exact(read, _HEAD.size))
    return recv_exact(read, size)


class Parts:
    """The data of a request held in memory: the envelopes and messages, one after
    the other, in as many pieces as they came in (nothing is joined)."""

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self._parts = [memoryview(part) for part in reversed(parts)]

    def next(self, size: int) -> memoryview:
        part = self._parts.pop()
        if len(part) > size:
            self._parts.append(part[size:])
            part = part[:size]
        return part


class _Received:
    """The data of a request from the relay: read at once when small, else streamed."""

    def __init__(self, read: Read, total: int) -> None:
        self._read = read
        self._whole = Parts([memoryview(recv_exact(read, total))]) if total <= INLINE else None
        self._buf = memoryview(bytearray(_CHUNK)) if self._whole is None else memoryview(b"")

    def next(self, size: int) -> memoryview:
        if self._whole is not None:
            return self._whole.next(size)
        got = recv_into(self._read, self._buf[:min(size, _CHUNK)])
        return self._buf[:got]


Source = Parts | _Received


def copy(source: Source, size: int, fd: int | None) -> OSError | None:
    """Take the next `size` bytes and write them into `fd`; the write's error, if any
    (the rest is still taken, so the next message starts where it should)."""
    failure = None
    while size:
        part = source.next(size)
        size -= len(part)
        try:
            while part and fd is not None:
                part = part[os.write(fd, part):]
        except OSError as e:
            failure, fd = e, None
    return failure


class _Entry:
    __slots__ = ("dir", "fds", "id", "reused")

    def __init__(self, queue_id: str, directory: str) -> None:
        self.id = queue_id
        self.dir = directory
        self.fds: list[int] = []
        self.reused = False

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _open(path: str, reuse: bool) -> int:
    """A new file, or with `reuse` one to write over in place and then cut to its new
    length: its blocks stay allocated, where O_TRUNC would free them all for the
    writes to allocate again (on ext4 about ten times the cost of the writes)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | (0 if reuse else os.O_EXCL), 0o600)


def store(source: Source, incoming: str, queue: str, trash: str,
          items: list[Item]) -> list[str | None]:
    """Write, sync and queue each message; per message None or why it was not stored."""
    errors: list[str | None] = [None] * len(items)
    staged: list[tuple[int, _Entry]] = []
    for i, (queue_id, reuse, env_len, msg_len) in enumerate(items):
        entry = _Entry(queue_id, os.path.join(incoming, queue_id))
        failure: OSError | None = None
        try:
            entry.reused = _make(entry.dir, reuse)
        except OSError as e:
            failure = e
        for name, size in ((ENVELOPE, env_len), (MESSAGE, msg_len)):
            fd = None
            if failure is None:
                try:
                    fd = _open(os.path.join(entry.dir, name), entry.reused)
                    entry.fds.append(fd)
                except OSError as e:
                    failure = e
            failure = copy(source, size, fd) or failure
            if failure is None and fd is not None and entry.reused:
                try:
                    os.ftruncate(fd, size)
                except OSError as e:
                    failure = e
        if failure is not None:
            errors[i] = _discard(entry, failure)
        else:
            staged.append((i, entry))
    for (i, _), error in zip(staged, commit([e for _, e in staged], incoming, queue, trash),
                             strict=True):
        errors[i] = error
    return errors


def _make(directory: str, reuse: str) -> bool:
    """Make the entry's directory from an emptied delivered one (True), else a new one."""
    if reuse:
        try:
            os.rename(reuse, directory)
            return True
        except FileNotFoundError:
            pass  # removed meanwhile (a restart's recovery)
    os.mkdir(directory, 0o700)
    return False


def commit(staged: list[_Entry], incoming: str, queue: str, trash: str) -> list[str | None]:
    """Make staged entries durable and move them into queue/; per entry None or why not."""
    errors: list[str | None] = [None] * len(staged)
    synced = len(staged) >= SYNCFS_BATCH and syncfs(incoming)
    if not synced and any(entry.reused for entry in staged):
        try:  # the reused entries have left trash/ for good (start-up empties trash/)
            fsync_dir(trash)
        except OSError as e:
            return [_discard(entry, e) for entry in staged]
    committed = []
    for i, entry in enumerate(staged):
        if not relay_alive():
            # Killed meanwhile: nobody waits for the answer, and a relay starting now
            # empties incoming/. Leave the entries there rather than race it.
            raise SystemExit(0)
        try:
            if not synced:
                for fd in entry.fds:
                    os.fsync(fd)
            entry.close()
            if not synced:
                fsync_dir(entry.dir)
            os.rename(entry.dir, os.path.join(queue, entry.id))
            committed.append(i)
        except OSError as e:
            errors[i] = _discard(entry, e)
    if committed:
        try:
            # First the names leave incoming/, then they are in queue/: on a file
            # system without a journal a crash in between leaves an entry in neither
            # (the client had no 250 and sends again), never in both (start-up
            # would empty the one in incoming/, which is the same directory).
            fsync_dir(incoming)
            fsync_dir(queue)
        except OSError as e:
            for i in committed:  # in queue/ but perhaps not durable: the client retries
                errors[i] = f"cannot sync the spool directory: {e.strerror}"
    return errors


def _discard(entry: _Entry, error: OSError) -> str:
    import shutil  # only here: each module is resident memory of this second interpreter

    entry.close()
    shutil.rmtree(entry.dir, ignore_errors=True)
    return f"cannot write the message to the spool: {error.strerror}"


def serve(fd: int) -> None:
    """Answer requests until the relay closes the connection."""

    def read(view: memoryview) -> int:
        return os.readv(fd, [view])

    def write(view: memoryview) -> int:
        return os.write(fd, view)

    try:
        while True:
            incoming, queue, trash, items = marshal.loads(recv_frame(read))
            source = _Received(read, sum(env_len + msg_len for _, _, env_len, msg_len in items))
            send_frame(write, marshal.dumps(store(source, incoming, queue, trash, items)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the relay closed the connection, or exited


def main(fd: int) -> None:
    # The relay decides when this ends (by closing the connection, or by exiting):
    # Ctrl-C in a terminal, or systemd's SIGTERM to the whole service, must not stop
    # it in the middle of a batch the relay is still waiting for.
    global _RELAY
    _RELAY = os.getppid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    serve(fd)


if __name__ == "__main__":
    main(int(sys.argv[1]))
