"""The built-in server `local`: each message becomes one file in the Maildir `<state_dir>/outbox`.

It shows what the relay would send: the message as the delivery rewrote it, with
`Return-Path:` (the envelope sender) and one `Delivered-To:` per recipient put in
front, as a mail server's local delivery does. Written to tmp/, fsynced, renamed
into new/ (the Maildir protocol, through `state.write_atomically`), so a reader
never sees half a message. The directories are 0700 and the files 0600 whatever
the umask, never made through a symbolic link.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Iterator
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
        state.write_atomically(self.maildir / "new" / name, self._chunks(message, head),
                               staging=self.maildir / "tmp")
        return name

    @staticmethod
    def _chunks(message: Outgoing, head: bytes) -> Iterator[bytes]:
        """The file's bytes as they are read: a large message is never whole in memory."""
        yield head
        if message.data is not None:
            yield message.data
            return
        yield message.head
        with message.path.open("rb") as src:
            src.seek(message.offset)
            while chunk := src.read(_COPY_CHUNK):
                yield chunk

    async def close(self) -> None:
        return None

    def not_before(self) -> float:
        return 0.0
