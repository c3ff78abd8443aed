"""The relay's end of the spool writer process (relay/spool_writer.py): starts it,
hands it a batch and reads the answer, notices when it stopped."""

from __future__ import annotations

import marshal
import socket
import subprocess
import sys
from collections.abc import Sequence

from . import spool_writer
from .spool_writer import Item, recv_frame, send_frame

Request = tuple[str, str, bytes, Sequence[bytes | memoryview]]
"""queue id, emptied entry to write over ("" for none), envelope, the message's parts"""


def items_of(requests: Sequence[Request]) -> list[Item]:
    return [(queue_id, reuse, len(env), sum(map(len, parts)))
            for queue_id, reuse, env, parts in requests]


def data_of(requests: Sequence[Request]) -> list[bytes | memoryview]:
    """What follows the header: each message's envelope, then its parts."""
    data: list[bytes | memoryview] = []
    for _, _, env, parts in requests:
        data.append(env)
        data.extend(parts)
    return data


class WriterGone(Exception):
    """The writer process stopped or could not be started; what it was doing is unknown."""


class Writer:
    """Starts the process on first use, and again after it stopped. Used from one
    thread at a time (the group commit's)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def store(self, incoming: str, queue: str, trash: str, items: Sequence[Request]
              ) -> list[str | None]:
        """Per message (id, emptied entry or "", envelope, message parts): None or why it
        was not stored. Raises WriterGone."""
        header = marshal.dumps((incoming, queue, trash, items_of(items)))
        data = data_of(items)
        if sum(map(len, data)) <= spool_writer.INLINE:
            data = [b"".join(data)]
        try:
            sock = self._connect()
            # The socket's own methods, not its descriptor: should `close` run in
            # another thread meanwhile, they fail rather than reach a file that got
            # the descriptor's number since.
            send_frame(sock.send, header, data)
            answer: list[str | None] = marshal.loads(recv_frame(sock.recv_into))
        except (OSError, EOFError, ValueError) as e:
            self.close()
            raise WriterGone(f"the spool writer process stopped or could not start ({e})"
                             ) from None
        return answer

    def start(self) -> None:
        """Start the process if it is not running. Raises WriterGone."""
        try:
            self._connect()
        except OSError as e:
            raise WriterGone(f"the spool writer process could not start ({e})") from None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            ours, theirs = socket.socketpair()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", spool_writer.__file__, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self._sock = ours
        return self._sock

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Stop the process (it ends when its connection closes)."""
        sock, self._sock = self._sock, None
        proc, self._proc = self._proc, None
        if sock is not None:
            sock.close()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
