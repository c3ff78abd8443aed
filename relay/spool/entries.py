"""Reading one entry back: its envelope, where its message is, its bytes.

An entry is read through one open file (or directory, for the earlier layout), never
through a symbolic link, so an entry that moves meanwhile is read whole or not found,
never called damaged. `relay.spool.store.Spool` decides where the entry is; this
module only reads what is there.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from relay.errors import DamagedEntry
from relay.spool import files
from relay.spool.envelope import Envelope
from relay.spool.files import ENVELOPE, MESSAGE

_HEADER_ROOM = files.RESERVED
"""A file up to the message's inline size and this much more is read in one go: its
header (an envelope, or the room kept before a message written out as it came) is
smaller in all but rare cases, which read the rest as before."""


@dataclass(frozen=True)
class Claimed:
    """An entry as `Spool.take` read it: its envelope, the file holding its message and
    where the message begins in it (after the header), and the message's bytes when
    they were asked for."""

    envelope: Envelope
    path: Path
    start: int
    data: bytes | None = None


def read_entry(entry: Path | str, saved: Path | str, system_errors: bool = False,
               inline: int = -1, mode: int | None = None) -> Claimed:
    """The envelope of an entry, read from one open file whatever moves meanwhile.

    The entry (a file, or a directory of the earlier layout) is opened once (a symlink
    is not followed) and read through that descriptor; then the envelope saved since
    the commit, if any, is read, and one that is absent is confirmed by the entry still
    being there: an entry that is claimed, put back or delivered while it is read is
    read whole, or not found; never taken for damaged. FileNotFoundError: no entry
    there (any more); DamagedEntry: the entry that is there cannot be read back. With
    `system_errors`, an error that says nothing about the entry (_SYSTEM_ERRORS) is
    raised as it is instead. With `inline` >= 0, a message up to that size is read, with
    the header in one read when the file is small. `mode`: the entry's lstat mode when
    the caller has it (`refuse_link`'s). Paths may be strings (the delivery's hot path
    makes no Path objects)."""
    queue_id = os.path.basename(entry)
    if mode is None:
        try:
            mode = os.lstat(entry).st_mode
        except FileNotFoundError:
            raise
        except OSError as e:
            files.system_error(e, system_errors)
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
        files.system_error(e, system_errors)
        what = ("a symbolic link, not an entry (not followed)" if os.path.islink(entry)
                else e.strerror)
        raise DamagedEntry(f"{entry}: {what}") from None
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        found: Envelope | str
        whole = b""
        if stat.S_ISDIR(mode):
            found = files.read_old(fd, queue_id, system_errors)
            path, start = os.path.join(entry, MESSAGE), 0
        elif stat.S_ISREG(mode):
            if inline >= 0 and info.st_size <= inline + _HEADER_ROOM:
                whole = files.read_small(fd, info.st_size)  # header and message at once
            read = files.read_file(fd, queue_id, system_errors, whole)
            found, start = read if isinstance(read, tuple) else (read, 0)
            path = os.fspath(entry)
        else:
            found = ": not a spool entry (neither a file nor a directory)"
        if isinstance(found, Envelope):
            latest = files.read_latest(saved, queue_id, system_errors)
            if latest is None and not files.still_at(fd, entry):
                raise FileNotFoundError(errno.ENOENT, "moved on while it was read",
                                        str(entry))
            if latest is None or isinstance(latest, Envelope):
                env = found if latest is None else latest
                data = None
                if 0 <= env.size <= inline:
                    data = whole[start:] if whole else files.read_message(
                        fd, start, mode, system_errors, entry)
                return Claimed(env, Path(path), start, data)
            found = f": its saved envelope {latest}"
        if not files.still_at(fd, entry):  # delivered, or moved on
            raise FileNotFoundError(errno.ENOENT, "moved on while it was read", str(entry))
        raise DamagedEntry(f"{entry}{found}")
    finally:
        os.close(fd)


def refuse_link(entry: Path | str, saved: Path | str) -> int:
    """Raise DamagedEntry when the entry, its saved envelope or (earlier layout) its
    files is a symbolic link: such an entry is quarantined, never followed. Returns the
    entry's lstat mode (for `read_entry`)."""
    mode = os.lstat(entry).st_mode  # FileNotFoundError: no entry
    if stat.S_ISLNK(mode):
        _linked(entry)
    paths = [saved]
    if stat.S_ISDIR(mode):
        paths += [os.path.join(entry, MESSAGE), os.path.join(entry, ENVELOPE)]
    for path in paths:
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                _linked(path)
        except FileNotFoundError:
            continue  # `read` says what is missing
    return mode


def _linked(path: Path | str) -> NoReturn:
    raise DamagedEntry(f"{path}: is a symbolic link (not followed; its target "
                       f"{os.readlink(path)} is left untouched)")


def message_path(entry: Path) -> Path:
    """The file that holds the entry's message: the entry itself, or for an entry of
    the earlier layout its `message` (`message_start` says where the message begins)."""
    return entry / MESSAGE if os.path.isdir(entry) and not os.path.islink(entry) else entry

def message_start(path: Path) -> int:
    """Where the message begins in `message_path`'s file. OSError, or DamagedEntry when
    the file is no entry."""
    if path.name == MESSAGE:
        return 0
    fd = files.open_regular(path)
    try:
        return files.message_start(fd)
    except files.BadHeader as e:
        raise DamagedEntry(f"{path}: not a spool entry: {e}") from None
    finally:
        os.close(fd)

def read_message(path: Path) -> bytes:
    """The message's bytes as the client sent them (without the entry's header)."""
    fd = files.open_regular(path)
    try:
        if path.name == MESSAGE:
            return files.read_fd(fd)
        return files.read_fd(fd, files.message_start(fd))
    except files.BadHeader as e:
        raise DamagedEntry(f"{path}: not a spool entry: {e}") from None
    finally:
        os.close(fd)
