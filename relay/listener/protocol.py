"""One SMTP session: aiosmtpd's `SMTP`, extended the way its documentation allows.

Commands are overridden as `smtp_*` methods calling aiosmtpd's own; the connection
is admitted or refused in `connection_made`; every reply goes through `push`,
which gives it clearer words and an enhanced status code (not the greeting's nor
EHLO's, RFC 2034 section 4). DATA streams the message into the spool as it
arrives (relay.listener.data), so a session holds a small buffer whatever the
message's size; the client gets the reply `Intake.receive` gives once the spool
has made the message durable. AUTH is never offered, and HELP does not list it.
What it needs of aiosmtpd's internals (the session's stream) and the shortcuts
it inherits (set-up, address parsing, one idle timer per session) come from
relay.listener.aiosmtpd_internals, the only module that touches them.
"""

from __future__ import annotations

import asyncio
from typing import Any, AnyStr, Protocol, cast

from aiosmtpd.smtp import Envelope, Session, syntax

from relay.listener.addresses import without_dsn
from relay.listener.aiosmtpd_internals import Shortcuts, stream_of
from relay.listener.data import TooBig, read_data
from relay.listener.replies import AUTH_NOT_OFFERED, with_enhanced_codes
from relay.spool import Incoming


class Intake(Protocol):
    """What a session needs from the listener."""

    handler: Any

    def admit(self, session: RelaySMTP, peer: Any) -> str | None: ...

    def forget(self, session: RelaySMTP) -> None: ...

    def better_reply(self, status: str) -> str: ...

    def incoming(self) -> Incoming: ...

    async def receive(self, session: Session, envelope: Envelope, message: Incoming) -> str: ...


class RelaySMTP(Shortcuts):
    """aiosmtpd's SMTP with the relay's connection policy and clearer replies."""

    line_length_limit = 65536
    """Command lines may be this long. Message lines are not limited (applications do
    send unwrapped HTML, and refusing it would lose their notifications); the message
    as a whole is, by listener.max_message_size."""

    raw_argument: str | None = None
    """The argument of the MAIL or RCPT command being handled, as the client wrote it."""

    def __init__(self, listener: Intake, **kwargs: Any) -> None:
        self._listener = listener
        self._refused = False
        self._greeting = False
        """The reply being written is the greeting, or EHLO's or HELO's 250: no enhanced
        status code there (RFC 2034, section 4)."""
        super().__init__(listener.handler, **kwargs)

    # --- the connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = self._listener.admit(self, transport.get_extra_info("peername"))
        if refusal:
            self._refused = True
            writer = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass
            writer.write(refusal.encode() + b"\r\n")
            writer.close()
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._listener.forget(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd answers nothing after the client's EOF (it cancels the session's
        # task), so the connection is closed once what is written has gone. Kept half
        # open, a client that connected and closed before its task first ran (uvloop
        # delivers both at once) would hold a connection slot until the idle timeout.
        if not self._refused:
            super().eof_received()
        return False

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = self._listener.better_reply(status)
            if not (self._greeting or status.startswith(f"220 {self.hostname} ")):
                status = with_enhanced_codes(status)
            # A reply may echo what the client sent (VRFY's argument): bytes that were
            # not UTF-8 go back as '?', where aiosmtpd's encoding would raise.
            await super().push(status.encode("utf-8", "replace"))
        else:
            await super().push(status)

    # --- commands ----------------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._greeting = bool(hostname)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._greeting = bool(hostname)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self.raw_argument = arg  # DSN parameters are the handler's to check and keep
        await super().smtp_MAIL(without_dsn(arg))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self.raw_argument = arg
        await super().smtp_RCPT(without_dsn(arg))

    async def smtp_AUTH(self, arg: str | None) -> None:
        """Never offered; not listed by HELP (no `syntax`). Checks as aiosmtpd's do."""
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.session.extended_smtp:
            await self.push("500 Error: command 'AUTH' not recognized")
            return
        await self.push(AUTH_NOT_OFFERED)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA, streaming the message into the spool as it arrives
        (relay.listener.data), then `Intake.receive` for the reply."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = self._listener.incoming()
        try:
            await read_data(stream_of(self), self.data_size_limit, message.write)
        except TooBig:
            message.discard()
            self.envelope = Envelope()
            await self.push("552 Error: Too much mail data")
            return
        except BaseException:  # the client left, the idle timer or shutdown closed it
            message.discard()
            if self.transport is not None:
                self.transport.close()
            raise
        status = await self._listener.receive(self.session, self.envelope, message)
        self.envelope = Envelope()
        await self.push(status)
