"""Upstream SMTP servers for the client's fault-injection tests, on 127.0.0.1 port 0.

`Script` is an aiosmtpd handler whose answers a test sets (per recipient, per
MAIL, at DATA) and which records what it got; `start_smtp` serves it with
aiosmtpd's `SMTP` in the test's own event loop. `start_raw` serves a bare asyncio
handler for misbehaviour aiosmtpd cannot produce (silence, one byte at a time, a
hang-up in the middle of DATA). `Servers` closes everything at the end of a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

_DSN_MAIL = ("RET=", "ENVID=")
_DSN_RCPT = ("NOTIFY=", "ORCPT=")


@dataclass
class Message:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Script:
    """What the server answers (lists are consumed one reply per command) and what it got."""

    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    mail_replies: list[str] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    hang_up_after: set[str] = field(default_factory=set)
    """Commands ("MAIL", "RCPT", "DATA") after whose scripted reply the server closes."""
    dsn: bool = False
    """Advertise DSN and accept its parameters (aiosmtpd knows neither)."""
    pipelining: bool = False
    """Advertise PIPELINING (aiosmtpd reads pipelined commands, but does not say so)."""
    data_gate: asyncio.Event | None = None
    """DATA's final reply waits for this event (never set: the server never answers)."""
    password: str | None = None
    """With a password, AUTH accepts user "sys" with it and answers 535 otherwise."""

    connections: int = 0
    live: set[SMTP] = field(default_factory=set)
    max_live: int = 0
    lines: list[str] = field(default_factory=list)
    """Raw MAIL and RCPT command arguments, as sent (DSN parameters included)."""
    mails: list[tuple[str, list[str]]] = field(default_factory=list)
    rcpts: list[tuple[str, list[str]]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    encrypted: list[bool] = field(default_factory=list)
    """For each MAIL: was the connection encrypted (STARTTLS or implicit TLS)?"""
    rsets: int = 0
    data_started: int = 0
    """Messages received up to the final dot (answered or not)."""
    in_data: int = 0
    logins: list[str] = field(default_factory=list)

    # --- aiosmtpd hooks --------------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.dsn:
            responses.insert(-1, "250-DSN")
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        self.mails.append((address, options))
        if self.mail_replies:
            return self._scripted(server, "MAIL", self.mail_replies.pop(0))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        self.rcpts.append((address, options))
        replies = self.rcpt_replies.get(address)
        reply = replies.pop(0) if replies else "250 2.1.5 OK"
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return self._scripted(server, "RCPT", reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_started += 1
        self.in_data += 1
        try:
            if self.data_gate is not None:
                await self.data_gate.wait()
        finally:
            self.in_data -= 1
        reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 OK queued"
        if reply.startswith("2"):
            assert envelope.mail_from is not None
            content = envelope.original_content
            assert isinstance(content, bytes)
            self.messages.append(Message(envelope.mail_from, list(envelope.mail_options),
                                         list(envelope.rcpt_tos), content))
        return self._scripted(server, "DATA", reply)

    def _scripted(self, server: SMTP, command: str, reply: str) -> str:
        if command in self.hang_up_after:
            # closed on the next turn of the loop, after aiosmtpd has written the reply
            asyncio.get_running_loop().call_soon(_close, server)
        return reply

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                           mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.logins.append(auth_data.login.decode())
        ok = (auth_data.login == b"sys" and self.password is not None
              and auth_data.password == self.password.encode())
        return AuthResult(success=ok, handled=False)

    # --- what a test does to the server ----------------------------------------------

    def hang_up_all(self, reply: str | None = None) -> int:
        """Close every open connection (an idle timeout), with a reply first if given."""
        closed = 0
        for server in list(self.live):
            if server.transport is not None and not server.transport.is_closing():
                if reply is not None:
                    cast(asyncio.WriteTransport, server.transport).write(reply.encode() + b"\r\n")
                _close(server)
                closed += 1
        return closed


def _close(server: SMTP) -> None:
    if server.transport is not None:
        server.transport.close()


class RecordingSMTP(SMTP):
    """aiosmtpd's SMTP that records raw MAIL/RCPT arguments and takes DSN parameters."""

    def __init__(self, script: Script, **kwargs: Any) -> None:
        super().__init__(script, **kwargs)
        self.script = script

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the STARTTLS upgrade of this connection
            self.script.live.add(self)
            self.script.max_live = max(self.script.max_live, len(self.script.live))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.script.live.discard(self)
        super().connection_lost(error)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.script.lines.append(f"MAIL {arg}")
        assert self.transport is not None
        self.script.encrypted.append(self.transport.get_extra_info("sslcontext") is not None)
        await super().smtp_MAIL(self._strip(arg, _DSN_MAIL))

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.script.lines.append(f"RCPT {arg}")
        await super().smtp_RCPT(self._strip(arg, _DSN_RCPT))

    async def smtp_RSET(self, arg: str) -> None:
        self.script.rsets += 1
        await super().smtp_RSET(arg)

    def _strip(self, arg: str | None, params: tuple[str, ...]) -> str | None:
        if arg is None or not self.script.dsn:
            return arg
        return " ".join(w for w in arg.split(" ") if not w.upper().startswith(params))


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Servers:
    """Starts servers in the running loop; `close()` stops them and their connections.

    `pipelining`: every aiosmtpd server started offers PIPELINING."""

    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining
        self._servers: list[asyncio.Server] = []
        self._smtp: list[RecordingSMTP] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def smtp(self, script: Script, port: int = 0, implicit_tls: ssl.SSLContext | None = None,
                   **kwargs: Any) -> int:
        """aiosmtpd serving `script`; kwargs go to SMTP (enable_SMTPUTF8, tls_context...)."""
        loop = asyncio.get_running_loop()
        kwargs.setdefault("hostname", "upstream.test")
        script.pipelining = script.pipelining or self.pipelining
        if script.password is not None:
            kwargs.setdefault("authenticator", script.authenticate)
            kwargs.setdefault("auth_require_tls", False)

        def factory() -> RecordingSMTP:
            script.connections += 1
            protocol = RecordingSMTP(script, loop=loop, **kwargs)
            self._smtp.append(protocol)
            return protocol

        server = await loop.create_server(factory, "127.0.0.1", port, ssl=implicit_tls)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def raw(self, handler: RawHandler, **kwargs: Any) -> int:
        """A bare asyncio server running `handler` for each connection."""

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            self._writers.append(writer)
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await handler(reader, writer)

        server = await asyncio.start_server(run, "127.0.0.1", 0, **kwargs)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def stop_listening(self) -> None:
        """Refuse new connections; those already open stay open."""
        for server in self._servers:
            server.close()
            await server.wait_closed()

    async def close(self) -> None:
        await self.stop_listening()
        for protocol in self._smtp:
            _close(protocol)
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _ in range(3):  # let aiosmtpd's handler tasks see their connections go
            await asyncio.sleep(0)


# --- raw misbehaviour ------------------------------------------------------------------


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts the connection and says nothing, not even a banner."""
    await reader.read()


def dribbling_ehlo(interval: float) -> RawHandler:
    """A banner at once, then the EHLO reply one byte per `interval` seconds."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ESMTP\r\n")
        await reader.readline()
        for byte in b"250-slow.test\r\n250-8BITMIME\r\n250 HELP\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval)

    return handler


async def hangs_up_in_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Takes MAIL and RCPT, starts DATA, reads one line of the message and closes."""
    writer.write(b"220 raw.test ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"DATA":
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            await reader.readline()
            writer.close()
            return
        writer.write(b"221 bye\r\n" if verb == b"QUIT" else b"250 raw.test\r\n")
        await writer.drain()


@dataclass
class Pipelined:
    """A raw server that offers PIPELINING and answers what arrives in one read together,
    as Postfix does; it records each read, and answers DATA with 354 even when no
    recipient was taken (a server that gets RFC 2920 wrong). Its commands may come one
    read each, or several in one."""

    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    dribble: bool = False
    """Send replies one byte at a time."""
    final_replies: list[bytes] = field(default_factory=list)
    """Replies to the final dots, in turn (after them 250, or 554 with no recipient taken);
    b"" answers nothing more on that connection."""
    hold_final: float = 0.0
    """Seconds to wait for the client's next commands before answering the first final dot."""
    early: list[bytes] = field(default_factory=list)
    """What arrived while that reply was held (b"": nothing)."""
    reads: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        chunk = await reader.read(65536)
        taken = 0  # recipients taken in this transaction
        while chunk:
            self.reads.append(chunk)
            replies = []
            for line in chunk.splitlines():
                verb = line[:4].upper()
                if verb in (b"MAIL", b"RSET"):
                    taken = 0
                if verb == b"RCPT":
                    address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    reply = self.rcpt_replies.get(address, b"250 2.1.5 ok")
                    taken += reply.startswith(b"2")
                    replies.append(reply)
                elif verb == b"DATA":
                    replies.append(b"354 go ahead")
                else:
                    replies.append(b"221 bye" if verb == b"QUIT" else b"250 ok")
            await self._answer(writer, replies)
            after = b""
            if chunk.rstrip().endswith(b"DATA"):
                lines = []
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    lines.append(line)
                self.messages.append(b"".join(lines))
                if self.hold_final and not self.early:
                    with contextlib.suppress(TimeoutError):
                        after = await asyncio.wait_for(reader.read(65536), self.hold_final)
                    self.early.append(after)
                final = (self.final_replies.pop(0) if self.final_replies
                         else b"250 2.0.0 queued" if taken
                         else b"554 5.5.1 Error: no valid recipients")
                if not final:  # silent from here on, until the client hangs up
                    while await reader.read(65536):
                        pass
                    return
                await self._answer(writer, [final])
                if final.startswith(b"421"):
                    writer.close()
                    return
            chunk = after or await reader.read(65536)

    async def _answer(self, writer: asyncio.StreamWriter, replies: list[bytes]) -> None:
        out = b"".join(reply + b"\r\n" for reply in replies)
        for piece in ([out[i:i + 1] for i in range(len(out))] if self.dribble else [out]):
            writer.write(piece)
            await writer.drain()


def banner(reply: bytes) -> RawHandler:
    """Answers the connection with `reply` (a 421, say) and closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply + b"\r\n")
        await writer.drain()
        writer.close()

    return handler


__all__ = ["Message", "Pipelined", "RecordingSMTP", "Script", "Servers", "banner",
           "dribbling_ehlo", "hangs_up_in_data", "never_answers"]
