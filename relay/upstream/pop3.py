"""An asyncio POP3 client (RFC 1939, STLS from RFC 2595), just enough for POP before SMTP.

poplib blocks, and no maintained asyncio POP3 client exists, so this one speaks
the few commands a POP-before-SMTP login needs: the greeting, CAPA, STLS,
USER/PASS or APOP, QUIT. It reads no mail.

Every step (connect, TLS handshake, each reply) is bounded by `timeout` and fails
with Pop3Timeout naming the step; a -ERR or a broken dialogue fails with Pop3Error
carrying the server's answer and the step. Lines are capped at 8 KiB, buffered
input at 64 KiB (reading pauses beyond it) and a multi-line answer at 1000 lines and
64 KiB, so a hostile server cannot exhaust memory. The password never
appears in an error, a step report or a log line; with `apop=True` it never
crosses the wire at all, and there is no silent fallback to USER/PASS.

The connection (relay.upstream.pop3_wire) is an asyncio Protocol with its own
buffer rather than a StreamReader, so that at STLS the client can see whether the
server sent anything after its +OK and before the handshake (bytes injected there
would otherwise be read later as if they had come over TLS) and refuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal, TypeVar

from relay.errors import Pop3Error, Pop3Timeout
from relay.upstream.pop3_wire import Connection, connect_failure, start_tls

__all__ = ["Encryption", "OnStep", "Pop3Client"]

Encryption = Literal["none", "tls", "starttls"]
OnStep = Callable[[str, float, str], None]
"""Called after each successful step with its name, its duration in seconds and the
server's answer (never what we sent)."""

_TIMESTAMP = re.compile(r"<[^<>\s]+>")
_T = TypeVar("_T")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HINTS = {
    "greeting": "the server does not accept connections from us now",
    "USER": "check pop_before_smtp.username and password",
    "PASS": "check pop_before_smtp.username and password",
    "APOP": "check pop_before_smtp.username and password, or set apop = false if the server "
    "has no APOP",
}


class Pop3Client:
    """One POP3 session. Use `connect`, then `login` and `quit`, or `async with`."""

    def __init__(
        self, conn: Connection, *, host: str, port: int, timeout: float, on_step: OnStep | None
    ) -> None:
        self._conn = conn
        self._host = host
        self._port = port
        self._timeout = timeout
        self._on_step = on_step
        self._tls = False
        self._closed = False
        self.greeting = ""
        self.apop_timestamp: str | None = None
        self._where = f"{host}:{port}"

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        encryption: Encryption,
        ssl_context: ssl.SSLContext | None,
        timeout: float,  # noqa: ASYNC109 - bounds each step, not the whole call
        on_step: OnStep | None = None,
    ) -> Pop3Client:
        """Connect, read the greeting, and secure the session as `encryption` says.

        `ssl_context` should verify the server (the caller builds it from the
        configuration); None means Python's default, verifying context.
        """
        if encryption not in ("none", "tls", "starttls"):
            raise ValueError(f"encryption must be none, tls or starttls, not {encryption!r}")
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(Connection, host, port)
        except TimeoutError:
            message = f"timeout after {timeout:g} s connecting to the POP3 server {host}:{port}"
            raise Pop3Timeout(message, stage="connect") from None
        except OSError as exc:
            raise Pop3Error(connect_failure(host, port, exc), stage="connect") from exc
        client = cls(conn, host=host, port=port, timeout=timeout, on_step=on_step)
        await client.handshake(encryption, ssl_context, start)
        return client

    async def handshake(self, encryption: Encryption, ssl_context: ssl.SSLContext | None,
                        start: float) -> None:
        """What `connect` does once connected (`start`: when it began): report it, then
        TLS, the greeting and STLS as `encryption` says."""
        try:
            transport = self._conn.transport
            peer = transport.get_extra_info("peername") if transport else None
            self._report("connect", start, f"connected to {peer[0]}:{peer[1]}" if peer else "")
            if encryption == "tls":
                await self._start_tls(ssl_context)
            self.greeting = await self._exchange(None, "greeting")
            match = _TIMESTAMP.search(self.greeting)
            self.apop_timestamp = match.group(0) if match else None
            if encryption == "starttls":
                await self.stls(ssl_context)
        except BaseException:
            self._abort()
            raise

    async def __aenter__(self) -> Pop3Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._closed:
            return
        if exc is None:
            await self.quit()
        else:
            self._abort()

    async def capa(self) -> list[str]:
        """The server's capabilities (RFC 2449), one line each, e.g. "STLS", "SASL PLAIN"."""
        capabilities = await self._capa()
        if capabilities is None:
            raise Pop3Error("the POP3 server does not support CAPA", stage="CAPA")
        return capabilities

    async def stls(self, ssl_context: ssl.SSLContext | None) -> None:
        """Upgrade the session to TLS with STLS, if the server offers it."""
        if self._tls:
            raise Pop3Error("the POP3 session already uses TLS", stage="STLS")
        capabilities = await self._capa()
        if not any(line.split()[:1] == ["STLS"] for line in capabilities or []):
            raise Pop3Error(
                f'the server does not offer STLS; set encryption = "none" or "tls" '
                f"(POP3 server {self._host}:{self._port})",
                stage="STLS",
            )
        await self._exchange(b"STLS", "STLS")
        await self._start_tls(ssl_context)

    async def login(self, username: str, password: str, *, apop: bool) -> str:
        """Log in with APOP or USER/PASS; return the server's +OK text."""
        if _CONTROL.search(username) or _CONTROL.search(password):
            raise Pop3Error(
                "the POP3 username or password contains a line break or control character; "
                "check pop_before_smtp.username and password",
                stage="APOP" if apop else "USER",
            )
        if apop:
            if self.apop_timestamp is None:
                raise Pop3Error(
                    "the server's greeting has no APOP timestamp; set apop = false to log in "
                    'with USER/PASS (preferably with encryption = "tls" or "starttls")',
                    stage="APOP",
                )
            digest = hashlib.md5((self.apop_timestamp + password).encode("utf-8")).hexdigest()
            return await self._exchange(
                b"APOP " + username.encode("utf-8") + b" " + digest.encode("ascii"), "APOP"
            )
        await self._exchange(b"USER " + username.encode("utf-8"), "USER")
        return await self._exchange(b"PASS " + password.encode("utf-8"), "PASS")

    async def quit(self) -> None:
        """End the session politely and close the connection."""
        try:
            await self._exchange(b"QUIT", "QUIT")
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection without QUIT, waiting at most `timeout` for it to go."""
        if self._closed:
            return
        self._closed = True
        transport = self._conn.transport
        if transport is None:
            return
        transport.close()
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(self._conn.closed)
        except TimeoutError:
            transport.abort()

    def _abort(self) -> None:
        self._closed = True
        if self._conn.transport is not None:
            self._conn.transport.abort()

    def _report(self, step: str, start: float, answer: str) -> None:
        if self._on_step is not None:
            self._on_step(step, time.monotonic() - start, answer)

    async def _start_tls(self, ssl_context: ssl.SSLContext | None) -> None:
        start = time.monotonic()
        try:
            info = await start_tls(self._conn, ssl_context or ssl.create_default_context(),
                                   self._host, self._port, self._timeout)
        except BaseException:
            self._abort()
            raise
        self._tls = True
        self._report("TLS handshake", start, info)

    async def _capa(self) -> list[str] | None:
        """CAPA's lines, or None when the server answers -ERR (it predates RFC 2449)."""

        async def exchange() -> list[str] | None:
            ok, _ = await self._command(b"CAPA", "CAPA")
            return await self._conn.read_multiline("CAPA", self._where) if ok else None

        start = time.monotonic()
        lines = await self._bounded(exchange(), "CAPA")
        if lines is not None:
            self._report("CAPA", start, " ".join(lines))
        return lines

    async def _exchange(self, command: bytes | None, step: str) -> str:
        """Send a command (None: just read, for the greeting) and return its +OK text."""
        start = time.monotonic()
        ok, text = await self._bounded(self._command(command, step), step)
        if not ok:
            hint = _HINTS.get(step)
            raise Pop3Error(
                f"the POP3 server refused {step}: {text}" + (f"; {hint}" if hint else ""),
                stage=step,
            )
        self._report(step, start, text)
        return text

    async def _bounded(self, awaitable: Awaitable[_T], step: str) -> _T:
        """Await one step within the timeout, translating what can go wrong."""
        try:
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except TimeoutError:
            self._abort()  # the dialogue is out of step now: never pair a late answer
            what = "the greeting" if step == "greeting" else f"the reply to {step}"
            raise Pop3Timeout(
                f"timeout after {self._timeout:g} s waiting for {what} "
                f"(POP3 server {self._host}:{self._port})",
                stage=step,
            ) from None
        except OSError as exc:
            self._abort()
            raise Pop3Error(
                f"the connection to the POP3 server {self._host}:{self._port} broke during "
                f"{step}: {exc}",
                stage=step,
            ) from exc
        except Pop3Error:
            self._abort()
            raise

    async def _command(self, command: bytes | None, step: str) -> tuple[bool, str]:
        """Send `command` and read its status line: (True, text) for +OK, (False, line) for -ERR."""
        if command is not None:
            if self._closed or self._conn.transport is None or self._conn.lost:
                raise Pop3Error(f"the POP3 connection is closed; cannot send {step}", stage=step)
            self._conn.transport.write(command + b"\r\n")
        line = await self._conn.read_line(step, self._where)
        if line[:3].upper() == "+OK":
            return True, line[3:].strip()
        if line[:4].upper() == "-ERR":
            return False, line
        raise Pop3Error(
            f"the POP3 server answered {step} with {line[:200]!r}, neither +OK nor -ERR; "
            "check port and encryption (is this a POP3 server?)",
            stage=step,
        )
