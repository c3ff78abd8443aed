"""The replies to a transaction's commands, read in order: what PIPELINING (RFC 2920) needs.

aiosmtplib reads one reply per command it writes and drops whatever arrives before
it asks, so MAIL, RCPT and DATA cannot go out together through it. While
transactions run, `Replies` stands in for aiosmtplib's protocol on the transport:
every reply the server sends is parsed and kept in order until it is asked for,
while the connection's other events (lost, end of file, pause and resume of
writing) still reach aiosmtplib's protocol, which owns the connection before and
after. Two transactions may overlap (the next one's commands follow the final dot
of the one before): each `with` block counts as one user, and the last one out
hands the connection back.

What is held is bounded as aiosmtplib bounds it (`aiosmtplib.protocol`): a reply
line over MAX_LINE bytes, or one reply (all its lines) over MAX_REPLY bytes, fails
the transaction as a temporary failure naming the cause, and the connection is
closed; replies that arrived before they were asked for stop the reading from the
socket once more than MAX_HELD bytes of them wait (the server waits, not our memory).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from types import TracebackType
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux
MAX_LINE = 8192
"""Longest reply line taken (aiosmtplib.protocol.MAX_LINE_LENGTH); a longer one breaks the
connection."""
MAX_REPLY = 4 * MAX_LINE
"""Longest reply taken, all its lines together (aiosmtplib.protocol.MAX_RESPONSE_LENGTH)."""
MAX_HELD = MAX_REPLY
"""Bytes of replies not yet asked for above which reading pauses until they are."""


class ReplyTooLong(aiosmtplib.SMTPException):
    """The server's reply is over a limit: no reply of a working server is (not a refusal)."""


class Replies(asyncio.Protocol):
    """Installed on the connection's transport while any `with` block is open."""

    _inner: SMTPProtocol
    _transport: asyncio.Transport

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self._client = client
        self._installed = False
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._reply_size = 0
        """Bytes in `_lines`: the reply being read so far."""
        self._ready: collections.deque[tuple[aiosmtplib.SMTPResponse, int]] = \
            collections.deque()
        """Replies not yet asked for, each with its size on the wire."""
        self._held = 0
        """Bytes of the replies in `_ready`, as they came."""
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._users = 0

    def __enter__(self) -> Replies:
        self._users += 1
        if self._installed or self._error is not None:
            return self
        protocol, transport = self._client.protocol, self._client.transport
        if protocol is None or transport is None or transport.is_closing():
            # gone already: the first reply asked for says so, at its stage
            self._error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        else:
            self._inner, self._transport = protocol, cast(asyncio.Transport, transport)
            self._transport.set_protocol(self)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._users -= 1
        if kind is not None:
            # a wait given up or a reply refused: out of step with the server for good
            self._out_of_step()
            return
        if self._users or not self._installed or self._transport.is_closing():
            return
        self._resume()
        self._transport.set_protocol(self._inner)
        self._installed = False
        if self._buffer or self._lines or self._ready:  # a reply nobody asked for
            self._out_of_step()

    def _out_of_step(self) -> None:
        """No later reply can be matched to its command: whoever asks next is told the
        connection is gone, and it is closed at once (abort: a close would first wait to
        send what is still buffered, to a server that may read nothing more)."""
        if self._error is None:
            self._error = aiosmtplib.SMTPServerDisconnected(
                "Connection closed: out of step with the server")
        self._ready.clear()
        self._buffer.clear()
        self._lines.clear()
        self._reply_size = self._held = 0
        if self._installed:
            self._transport.abort()  # what is still unsent is of no use now
        self._client.close()
        self._wake()

    # --- for the transaction ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send; a connection that is gone shows as the error of the next reply asked for."""
        if self._error is not None:
            return
        if self._transport.is_closing():
            self._error = aiosmtplib.SMTPServerDisconnected("Connection lost")
            return
        self._transport.write(data)

    async def drain(self, wait: float) -> None:
        """Wait until the transport can take more (the server reads what was written)."""
        if self._error is not None:
            return  # the next reply asked for raises it
        try:
            await asyncio.wait_for(self._inner._drain_helper(), wait)
        except TimeoutError:
            raise aiosmtplib.SMTPTimeoutError(
                "Timed out waiting for the server to read the message") from None

    async def next(self, wait: float) -> aiosmtplib.SMTPResponse:
        """The next reply in order; SMTPReadTimeoutError after `wait` seconds without one,
        SMTPServerDisconnected when the connection is gone."""
        if not self._ready and self._error is None:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(wait, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._ready:
            reply, size = self._ready.popleft()
            self._held -= size
            if self._held <= MAX_HELD:
                self._resume()
            return reply
        assert self._error is not None
        raise self._error

    # --- asyncio.Protocol ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._users > 1:
            self._ack_now()
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end + 1])
            del self._buffer[:end + 1]
            if not self._line(line):
                return
        if len(self._buffer) > MAX_LINE:
            self._fail(ReplyTooLong(f"Response too long: a reply line over {MAX_LINE} bytes"))
        elif self._held > MAX_HELD and not self._paused:
            self._paused = True  # resumed by `next` once the replies are taken
            self._transport.pause_reading()

    def _ack_now(self) -> None:
        """Acknowledge what just arrived at once, not up to 40 ms later (delayed ACK).

        With a transaction waiting behind another, this is the reply to a final dot,
        and the next transaction's commands went out before it came: nothing of ours
        will carry the acknowledgement until the server answers them. A server with
        Nagle's algorithm on holds those answers until its last write is acknowledged."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None and _QUICKACK is not None:
            with contextlib.suppress(OSError):  # not TCP, or gone: only a delay is at stake
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _line(self, line: bytes) -> bool:
        if len(line) > MAX_LINE:
            self._fail(ReplyTooLong(f"Response too long: a reply line over {MAX_LINE} bytes"))
            return False
        self._reply_size += len(line)
        if self._reply_size > MAX_REPLY:
            self._fail(ReplyTooLong(
                f"Response too long: a reply over {MAX_REPLY} bytes (aiosmtplib's limit), "
                f"{len(self._lines) + 1} lines so far"))
            return False
        if not line[:3].isdigit():
            shown = line[:100].decode(errors="replace")
            self._fail(aiosmtplib.SMTPResponseException(
                -1, f"Malformed SMTP response line: {shown!r}"))
            return False
        self._lines.append(line)
        if line[3:4] != b"-":
            text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
            reply = aiosmtplib.SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape"))
            self._ready.append((reply, self._reply_size))
            self._held += self._reply_size
            self._lines.clear()
            self._reply_size = 0
            self._wake()
        return True

    def _fail(self, error: Exception) -> None:
        """The server broke the protocol: nothing more is read from this connection."""
        self._error = error
        self._buffer.clear()
        self._lines.clear()
        self._reply_size = 0
        self._transport.abort()
        self._wake()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = aiosmtplib.SMTPServerDisconnected("Connection lost")
            self._error.__cause__ = exc
        self._wake()
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool:
        self._inner.eof_received()
        return False  # close the transport: connection_lost follows

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(aiosmtplib.SMTPReadTimeoutError(
            "Timed out waiting for server response"))
