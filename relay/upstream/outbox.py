"""The built-in server `local`: each message becomes one file in the Maildir `<state_dir>/outbox`.

It shows what the relay would send: the message as the delivery rewrote it, with
`Return-Path:` (the envelope sender) and one `Delivered-To:` per recipient put in
front, as a mail server's local delivery does. Written to tmp/, fsynced, renamed
into new/ (the Maildir protocol), so a reader never sees half a message. The
directories are 0700 and the files 0600 whatever the umask, never made through a
symbolic link.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path

from relay.errors import TemporaryFailure
from relay.spool import state
from relay.upstream.base import Outcome, Outgoing

_COPY_CHUNK = 1 << 20


class LocalOutbox:
    name = "local"
    wants_data = False  # the file is copied in chunks

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self._seq = itertools.count()
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def ensure(self) -> None:
        state.private_dir(self.maildir)
        for sub in ("tmp", "new", "cur"):
            state.private_dir(self.maildir / sub)

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        try:
            name = await asyncio.to_thread(self._write, message)
        except OSError as e:
            raise TemporaryFailure(f"cannot write into the outbox {self.maildir}: {e.strerror}",
                                   stage="outbox") from e
        reply = f"250 2.0.0 written to {self.maildir / 'new' / name}"
        return [Outcome(r.address, reply) for r in message.recipients]

    def _write(self, message: Outgoing) -> str:
        self.ensure()
        now = time.time()
        name = f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(self._seq)}" \
               f"_{message.envelope.id}.{self._host}"
        head = f"Return-Path: <{message.mail_from}>\r\n".encode() + b"".join(
            f"Delivered-To: {r.address}\r\n".encode() for r in message.recipients)
        tmp = self.maildir / "tmp" / name
        fd = state.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out, message.path.open("rb") as src:
                out.write(head)
                if message.data is not None:
                    out.write(message.data)
                else:
                    out.write(message.head)
                    src.seek(message.offset)
                    while chunk := src.read(_COPY_CHUNK):
                        out.write(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.maildir / "new" / name)
        dirfd = os.open(self.maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return name

    async def close(self) -> None:
        return None

    def not_before(self) -> float:
        return 0.0
