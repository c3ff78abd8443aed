"""The POP3 connection's bytes: buffered input with flow control, read as lines.

`Connection` is the asyncio Protocol under relay.upstream.pop3's client: it keeps
what arrived in its own buffer (so that at STLS the client can see bytes sent
before the handshake), pauses reading beyond 64 KiB, and reads one line (at most
8 KiB) or a multi-line answer (at most 1000 lines and 64 KiB), so a hostile server
cannot exhaust memory. `start_tls` upgrades it to TLS in place, refusing bytes the
server sent before the handshake (they would later be read as if they had come over
TLS). `connect_failure` words a failed connect for the operator.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import cast

from relay.errors import Pop3Error, Pop3Timeout

MAX_LINE = 8192
MAX_BUFFER = 65536
MAX_LINES = 1000


class Connection(asyncio.Protocol):
    """Bytes in, with flow control, and a way to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lost = False
        self.closed = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFER and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_for_data(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_multiline(self, step: str, where: str) -> list[str]:
        """The lines of a multi-line answer up to the lone ".", dot-unstuffed."""
        lines: list[str] = []
        size = 0
        while (line := await self.read_line(step, where)) != ".":
            size += len(line) + 2
            if len(lines) >= MAX_LINES or size > MAX_BUFFER:
                raise Pop3Error(
                    f"the POP3 server's answer to {step} is longer than {MAX_LINES} lines "
                    f"or {MAX_BUFFER} bytes",
                    stage=step,
                )
            lines.append(line[1:] if line.startswith(".") else line)
        return lines

    async def read_line(self, step: str, where: str) -> str:
        """One line without its CRLF (a bare LF is accepted), decoded leniently.

        `where` is the server, "host:port", for the error texts."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_LINE:
                break
            if self.lost:
                raise Pop3Error(
                    f"the POP3 server {where} closed the connection during {step}",
                    stage=step,
                )
            await self.wait_for_data()
        if end < 0 or end > MAX_LINE:
            raise Pop3Error(
                f"the POP3 server sent a line longer than {MAX_LINE} bytes during {step}",
                stage=step,
            )
        raw = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return raw.rstrip(b"\r\n").decode("utf-8", errors="replace")


async def start_tls(conn: Connection, context: ssl.SSLContext, host: str, port: int,
                    timeout: float) -> str:  # noqa: ASYNC109 - bounds the handshake
    """Upgrade `conn` to TLS within `timeout` (its transport becomes the TLS one); return
    the version and cipher, for the step's report. Pop3Error or Pop3Timeout naming the
    cause; the caller aborts the connection."""
    transport = conn.transport
    assert transport is not None
    where = f"the POP3 server {host}:{port}"
    step = "TLS handshake"
    if conn.buffer:
        raise Pop3Error(
            f"{where} sent data before the TLS handshake ({bytes(conn.buffer[:40])!r}); "
            'refusing it. With encryption = "tls", is this a plain POP3 port? '
            'With "starttls", someone may be injecting data into the connection',
            stage=step,
        )
    try:
        async with asyncio.timeout(timeout):
            new = await asyncio.get_running_loop().start_tls(
                transport, conn, context, server_hostname=host)
        if new is None:  # only when the connection went away meanwhile
            raise ConnectionResetError("connection closed")
    except TimeoutError:
        raise Pop3Timeout(f"timeout after {timeout:g} s in the TLS handshake with {where}",
                          stage=step) from None
    except ssl.SSLCertVerificationError as exc:
        raise Pop3Error(f"{where} failed certificate verification: {exc.verify_message}; "
                        "check the server name, or trust its CA with ca_file", stage=step
                        ) from exc
    except (OSError, EOFError) as exc:
        raise Pop3Error(f"the TLS handshake with {where} failed: {exc}; check port and "
                        "encryption", stage=step) from exc
    conn.transport = new
    info = new.get_extra_info("ssl_object")
    return f"{info.version()} {info.cipher()[0]}" if info else ""


def connect_failure(host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot resolve the POP3 server name {host!r}: {exc.strerror}; "
            "check pop_before_smtp.host"
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"the POP3 server {host}:{port} refused the connection (nothing listens there); "
            "check pop_before_smtp.host, port and encryption"
        )
    return f"cannot connect to the POP3 server {host}:{port}: {exc.strerror or exc}"
