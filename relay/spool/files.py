"""The spool's files: an entry's one file, and the atomic write of every other file.

An entry accepted by this version is one regular file (`relay.spool` says where it
sits). It begins with a header and the message follows it, byte for byte as the
client sent it:

    RELAYQ1 hhhhhhh\\n     16 bytes: the magic, and in hex the header's length H
    {"id":...}            the envelope as it was at the commit (JSON, one line)
    spaces, then \\n       padding up to H (a message written out while it was still
                          being received keeps room for its envelope before it)
    the message           bytes H to the end of the file

One file, so one fdatasync makes the envelope and the message durable together.
Later changes of the envelope (attempts, recipient states, the dead letter's
reason) are not written into it: `write_atomically` puts them in a file of their
own (`state.write_atomically`), which the spool reads instead of the header's
envelope.

Entries written before this layout (a directory holding `message` and
`envelope.json`) are still read and delivered; nothing here writes one.
Reading an entry: `read_file` (this layout), `read_old` (the earlier one),
`read_latest` (a saved envelope); each gives the envelope or what is wrong.
No settings, no network code.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from relay.errors import DamagedEntry
from relay.spool.envelope import Envelope

MESSAGE = "message"
ENVELOPE = "envelope.json"
"""The two files of an entry of the earlier layout (a directory); read, never written."""

MAGIC = b"RELAYQ1 "
PREAMBLE = 16
"""The magic, 7 hex digits (the header's length) and a newline."""
RESERVED = 1 << 14
"""The header's room in the file of a message written out while it is received,
before its envelope is known: the message starts at this offset (page aligned)."""
MAX_HEADER = 0xFFFFFFF


def header(envelope_json: bytes, room: int = 0) -> bytes:
    """The header for `envelope_json`, padded to `room` bytes when it fits in them."""
    length = PREAMBLE + len(envelope_json) + 1
    if length > MAX_HEADER:
        raise ValueError("the envelope is too large for an entry's header")
    if room >= length:
        return b"%s%07X\n%s%s\n" % (MAGIC, room, envelope_json, b" " * (room - length))
    return b"%s%07X\n%s\n" % (MAGIC, length, envelope_json)


def placeholder() -> bytes:
    """What the RESERVED bytes hold until the envelope is written over them."""
    return b"%s%07X\n%s\n" % (MAGIC, RESERVED, b" " * (RESERVED - PREAMBLE - 1))


class BadHeader(ValueError):
    """The file is not an entry of this layout (or its header is cut short)."""


def read_header(fd: int, first: bytes = b"") -> tuple[bytes, int]:
    """The envelope's JSON in the entry file `fd` and where the message starts.
    BadHeader when the file is not an entry; OSError when it cannot be read. `first`:
    the file's first bytes when the caller read them already (`read_small`)."""
    preamble = first[:PREAMBLE] if len(first) >= PREAMBLE else os.pread(fd, PREAMBLE, 0)
    if len(preamble) < PREAMBLE or not preamble.startswith(MAGIC) or preamble[-1:] != b"\n":
        raise BadHeader("it does not begin with the spool's header (RELAYQ1)")
    try:
        length = int(preamble[len(MAGIC):-1], 16)
    except ValueError:
        raise BadHeader("its header's length is not a number") from None
    if length <= PREAMBLE + 1:
        raise BadHeader("its header's length is too small")
    raw = first[PREAMBLE:length] if len(first) >= length else os.pread(
        fd, length - PREAMBLE, PREAMBLE)
    if len(raw) < length - PREAMBLE or not raw.endswith(b"\n"):
        raise BadHeader(f"it is cut short in its header ({PREAMBLE + len(raw)} of {length} "
                        "bytes)")
    return raw, length


def message_start(fd: int) -> int:
    """Where the message starts in the entry file `fd` (OSError/BadHeader as read_header)."""
    return read_header(fd)[1]


def open_regular(path: Path | str, dir_fd: int | None = None) -> int:
    """Open a file for reading; OSError when it is not a regular file (a FIFO must not
    block us) or is a symbolic link (never followed: its target is not ours to send or
    truncate). `path` is relative to the directory `dir_fd` when one is given."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link (not followed)", str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, offset: int = 0) -> bytes:
    """The bytes of the open file `fd` from `offset` to its end."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, max(size - offset, 0) + 1, offset)  # short only at the end
    if len(data) <= size - offset:
        return data
    parts = [data]
    offset += len(data)
    while part := os.pread(fd, 1 << 20, offset):
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def read_small(fd: int, size: int) -> bytes:
    """The whole file `fd` of `size` bytes (its fstat) in one read; b"" when it is not
    exactly that size now or cannot be read (the caller then reads it piece by piece,
    and says what is wrong)."""
    try:
        data = os.pread(fd, size + 1, 0)
    except OSError:
        return b""
    return data if len(data) == size else b""


def read_regular(path: Path | str, dir_fd: int | None = None, offset: int = 0) -> bytes:
    """A regular file's bytes from `offset` on (`open_regular` says what is refused)."""
    fd = open_regular(path, dir_fd)
    try:
        return read_fd(fd, offset)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


SYSTEM_ERRORS = frozenset({errno.EIO, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE,
                            errno.ENOMEM, errno.EAGAIN, errno.EINTR})
"""Errors reading an entry that say nothing about the entry itself."""


def system_error(e: OSError, system_errors: bool) -> None:
    if system_errors and e.errno in SYSTEM_ERRORS:
        raise e


def read_old(fd: int, queue_id: str, system_errors: bool = False) -> Envelope | str:
    """The envelope in the entry directory `fd` (the layout before one file per entry),
    or what is wrong with the entry (the text that follows the entry's path in the
    DamagedEntry)."""
    try:
        env = Envelope.from_json(read_regular(ENVELOPE, dir_fd=fd))
    except FileNotFoundError:
        return f"/{ENVELOPE}: the envelope is missing"
    except (ValueError, TypeError, KeyError) as e:
        return f"/{ENVELOPE}: the envelope cannot be read ({e})"
    except OSError as e:
        system_error(e, system_errors)
        return f"/{ENVELOPE}: {e.strerror}"
    if env.id != queue_id:
        return f"/{ENVELOPE}: the envelope belongs to {env.id}, not {queue_id}"
    try:
        mode = os.stat(MESSAGE, dir_fd=fd, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            return (f"/{MESSAGE}: is a symbolic link (not followed; its target "
                    f"{os.readlink(MESSAGE, dir_fd=fd)} is left untouched)")
        if not stat.S_ISREG(mode):
            return ": the message file is missing (a directory or device in its place)"
    except FileNotFoundError:
        return ": the message file is missing"
    except OSError as e:
        system_error(e, system_errors)
        return f"/{MESSAGE}: {e.strerror}"
    return env


def read_file(fd: int, queue_id: str, system_errors: bool = False, first: bytes = b""
              ) -> tuple[Envelope, int] | str:
    """The envelope in the header of the entry file `fd` and where its message starts,
    or what is wrong with it (`first`: as for `read_header`)."""
    try:
        raw, start = read_header(fd, first)
        env = Envelope.from_json(raw)
    except BadHeader as e:
        return f": not a spool entry: {e}"
    except (ValueError, TypeError, KeyError) as e:
        return f": the envelope in its header cannot be read ({e})"
    except OSError as e:
        system_error(e, system_errors)
        return f": {e.strerror}"
    if env.id != queue_id:
        return f": the envelope in its header belongs to {env.id}, not {queue_id}"
    return env, start


def read_latest(path: Path | str, queue_id: str, system_errors: bool) -> Envelope | str | None:
    """The envelope saved since the commit (ENVELOPES/ID), None when there is none, or
    what is wrong with it."""
    try:
        env = Envelope.from_json(read_regular(path))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        return f"{path}: the envelope cannot be read ({e})"
    except OSError as e:
        system_error(e, system_errors)
        return f"{path}: {e.strerror}"
    if env.id != queue_id:
        return f"{path}: the envelope belongs to {env.id}, not {queue_id}"
    return env


def read_message(fd: int, start: int, mode: int, system_errors: bool, entry: Path | str
                 ) -> bytes:
    """The message of the entry open as `fd` (a file, or a directory of the earlier layout)."""
    try:
        if stat.S_ISDIR(mode):
            return read_regular(MESSAGE, dir_fd=fd)
        return read_fd(fd, start)
    except OSError as e:
        system_error(e, system_errors)
        raise DamagedEntry(f"{entry}: the message cannot be read: {e.strerror}") from None


def still_at(fd: int, entry: Path | str) -> bool:
    """Whether the entry open as `fd` is still the one at `entry`."""
    try:
        there = os.stat(entry, follow_symlinks=False)
    except OSError:
        return False
    here = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)
