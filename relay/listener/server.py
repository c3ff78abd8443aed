"""The listener: applications hand their mail to it over SMTP, unauthenticated.

aiosmtpd's protocol, served by `loop.create_server` in the daemon's own loop.
Connections are accepted only from `listener.allowed_networks` (554 otherwise)
and up to `listener.max_connections` (421 beyond). SIZE, recipients per message
and idle time are bounded. DATA is streamed into the spool's incoming file as it
arrives (relay.listener.data), so a session holds a small buffer whatever the message's
size; the client's bytes are kept unchanged (the rewrite is applied when the message
is sent). Only when the spool has made the message durable does the client get 250;
if the write fails the client gets 451 4.3.0, and a message that is too big or
interrupted leaves nothing behind.

Every 2xx, 4xx and 5xx reply but the greeting and EHLO's carries an enhanced status
code (RFC 2034, advertised as ENHANCEDSTATUSCODES); HELP lists only what the relay
takes (no AUTH). `RCPT TO:<postmaster>` without a domain is taken (RFC 5321 4.5.1)
for queue.notify, else the system address; a local part over 64 octets or a domain
over 255 gets 553.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from relay.errors import SpoolError
from relay.listener.data import TooBig, read_data
from relay.listener.slots import LocalSlots, SharedSlots
from relay.metrics import IntakeMetrics
from relay.rewrite import header_value
from relay.settings import Settings
from relay.spool.store import Envelope as SpoolEnvelope
from relay.spool.store import Incoming, Recipient, Spool, new_queue_id

log = logging.getLogger("relay.listener")

LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]+@[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]+$")
_KEPT_MAIL_OPTIONS = ("BODY=8BITMIME", "SMTPUTF8")
_DSN = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}
_DSN_VALUE = {
    "RET": re.compile(r"^(FULL|HDRS)$", re.I),
    "ENVID": re.compile(r"^[\x21-\x7e]{1,100}$"),
    "NOTIFY": re.compile(r"^(NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*)$", re.I),
    "ORCPT": re.compile(r"^[A-Za-z0-9-]+;[\x21-\x7e]{1,500}$"),
}


def _utf8(text: str) -> bool:
    """aiosmtpd keeps undecodable bytes as surrogates; such an address is no UTF-8 address."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dsn_parameters(raw: str | None, command: str) -> list[str] | None:
    """The DSN parameters (RFC 3461) of a raw MAIL or RCPT argument, case kept; None if bad.

    aiosmtpd upper-cases parameters and refuses the ones it does not know, so the
    relay reads these from the command line as the client wrote it.
    """
    if not raw or ">" not in raw:
        return []
    found: list[str] = []
    for param in raw.rsplit(">", 1)[1].split():
        key, _, value = param.partition("=")
        if key.upper() in _DSN[command]:
            if not _DSN_VALUE[key.upper()].match(value):
                return None
            found.append(f"{key.upper()}={value}")
    return found


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(
    rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*")


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """`<local@domain> params` as (address, params) when it is the plain, common form
    (dot-atoms, no quotes, comments or routes): what aiosmtpd's parser would return,
    at a fraction of its cost. None: let the parser decide."""
    m = _PLAIN_ANGLE_ADDR.match(arg)
    if m is None or arg.startswith("(", m.end()):
        return None
    return m.group(1), arg[m.end():]


def _over_limits(address: str) -> str | None:
    """What is too long in `address` (RFC 5321 4.5.3.1: local part 64 octets, domain 255),
    or None."""
    local, _, domain = address.rpartition("@")
    if (size := len(local.encode("utf-8"))) > LOCAL_PART_MAX:
        return f"has a local part of {size} octets: at most {LOCAL_PART_MAX} (RFC 5321 4.5.3.1.1)"
    if (size := len(domain.encode("utf-8"))) > DOMAIN_MAX:
        return f"has a domain of {size} octets: at most {DOMAIN_MAX} (RFC 5321 4.5.3.1.2)"
    return None


_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "220": "2.0.0", "250": "2.0.0", "252": "2.5.0",
    "421": "4.3.2", "451": "4.3.0", "452": "4.5.3", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "550": "5.1.1", "552": "5.3.4", "553": "5.1.3", "554": "5.7.1",
    "555": "5.5.4",
}


def with_enhanced_codes(reply: str) -> str:
    """Every 2xx, 4xx and 5xx line of `reply` with an enhanced status code (RFC 2034 and
    RFC 3463): the one it has, or the usual one for its reply code."""
    lines = reply.split("\r\n")
    for i, line in enumerate(lines):
        code = line[:3]
        if line[:1] not in "245" or not code.isdigit() or _ENHANCED.match(line):
            continue
        enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
        lines[i] = f"{line[:4]}{enhanced} {line[4:]}".rstrip(" ")
    return "\r\n".join(lines)


_HOOK_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """What aiosmtpd looks for by name, for `__dir__`.

    For every connection aiosmtpd finds its command methods, AUTH mechanisms and
    handler hooks with dir() and inspect.getmembers(), which look at every attribute
    of the class: about half the cost of a connection's set-up. Listing only the
    names it can use (they depend on the class alone) gives it the same methods.
    """
    key = (cls, prefixes)
    if key not in _HOOK_NAMES:
        _HOOK_NAMES[key] = sorted(name for name in dir(cls) if name.startswith(prefixes))
    return _HOOK_NAMES[key]


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with the relay's connection policy and clearer replies."""

    line_length_limit = 65536
    """Command lines may be this long. Message lines are not limited (applications do
    send unwrapped HTML, and refusing it would lose their notifications); the message
    as a whole is, by listener.max_message_size."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA, streaming the message into the spool as it arrives
        (relay.listener.data), then `Listener.receive` for the reply."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = self._listener.spool.receive(new_queue_id())
        try:
            await read_data(self._reader, self.data_size_limit, message.write)
        except TooBig:
            message.discard()
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        except BaseException:  # the client left, the idle timer or shutdown closed it
            message.discard()
            self._writer.close()
            raise
        assert self.session is not None
        status = await self._listener.receive(self.session, self.envelope, message)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        self._listener = listener
        self._refused = False
        super().__init__(listener.handler, **kwargs)

    _raw_arg: str | None = None
    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timeout, without a new timer for every command: a timer that
        fires no later than the deadline stays, and on firing waits out the rest."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is not None and not timer.cancelled() and timer.when() <= self._deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self._deadline - self.loop.time() > 0.001:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
        else:
            self._timeout_cb()  # type: ignore[no-untyped-call]

    def __dir__(self) -> list[str]:
        return _hook_names(type(self), ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = plain_angle_addr(arg)
        if plain is None or (self.local_part_limit and
                             len(plain[0].rpartition("@")[0]) > self.local_part_limit):
            return super()._getaddr(arg)
        return plain

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._raw_arg = arg
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._raw_arg = arg
        await super().smtp_RCPT(arg)

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        found = super()._getparams(params)
        if found is not None:  # DSN parameters are the handler's to check and keep
            for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                found.pop(key, None)
        return found

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._refused:  # not the STARTTLS re-entry
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

    _greeting = False
    """The reply being written is the greeting, or EHLO's or HELO's 250: no enhanced
    status code there (RFC 2034, section 4)."""

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

    def _syntax_available(self, method: Callable[..., Any]) -> bool:
        """HELP lists only what this relay takes: not AUTH, which it never offers."""
        if getattr(method, "__name__", "") == "smtp_AUTH":
            return False
        return bool(super()._syntax_available(method))


class IntakeHandler:
    """aiosmtpd hooks: check the envelope (DATA is RelaySMTP.smtp_DATA's, which streams it)."""

    def __dir__(self) -> list[str]:
        return _hook_names(type(self), ("handle_",))

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """aiosmtpd's lines plus DSN and ENHANCEDSTATUSCODES (RFC 2034), as one reply:
        aiosmtpd writes each line it is given with a system call (and a TCP segment) of
        its own; the lines are the same."""
        session.host_name = hostname
        return ["\r\n".join([*responses[:-1], "250-DSN", "250-ENHANCEDSTATUSCODES",
                             responses[-1]])]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if address != "<>" and not _ADDRESS.match(address):
            return f"553 5.1.7 Sender address {address!r} is not of the form local-part@domain"
        if not _utf8(address):
            return "553 5.6.7 Sender address is not valid UTF-8"
        if address != "<>" and (too_long := _over_limits(address)):
            return f"553 5.1.7 Sender address {too_long}"
        dsn = dsn_parameters(getattr(server, "_raw_arg", None), "MAIL")
        if dsn is None:
            return "501 5.5.4 Invalid RET or ENVID parameter (RFC 3461)"
        envelope.mail_from = address  # "<>" for the null sender: aiosmtpd needs it non-empty
        envelope.mail_options.extend(o for o in mail_options if o in _KEPT_MAIL_OPTIONS)
        envelope.mail_options.extend(dsn)
        return "250 2.1.0 Sender OK (the system address will be the sender)"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        limit = self.listener.settings.listener.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            self.listener.metrics.messages_rejected.labels("recipients").inc()
            return f"452 4.5.3 Too many recipients: at most {limit} per message, send the rest " \
                   "in another transaction"
        if address.lower() == "postmaster":  # RFC 5321 4.5.1: taken without a domain
            address = self.listener.postmaster() or address
        elif not _ADDRESS.match(address):
            return f"553 5.1.3 Recipient address {address!r} is not of the form local-part@domain"
        if not _utf8(address):
            return "553 5.6.7 Recipient address is not valid UTF-8"
        if too_long := _over_limits(address):
            return f"553 5.1.3 Recipient address {too_long}"
        dsn = dsn_parameters(getattr(server, "_raw_arg", None), "RCPT")
        if dsn is None:
            return "501 5.5.4 Invalid NOTIFY or ORCPT parameter (RFC 3461)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(" ".join(dsn))  # one entry per recipient
        return "250 2.1.5 Recipient OK"


# aiosmtpd reads handle_EHLO's signature for every connection (which form of the hook
# it is); a signature set on the function is returned at once.
setattr(IntakeHandler.handle_EHLO, "__signature__",  # noqa: B010
        inspect.signature(IntakeHandler.handle_EHLO))


class Listener:
    def __init__(self, settings: Settings, spool: Spool, metrics: IntakeMetrics,
                 on_queued: Callable[[SpoolEnvelope], None],
                 slots: LocalSlots | SharedSlots | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.on_queued = on_queued
        self.slots = slots or LocalSlots()
        """Connections open, against listener.max_connections (shared by the workers)."""
        self.handler = IntakeHandler(self)
        self.hostname = settings.listener.hostname or socket.gethostname()
        self._sessions: set[RelaySMTP] = set()
        self._servers: list[asyncio.Server] = []
        self.address: tuple[str, int] | None = None

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None,
                    serving: bool = True) -> None:
        """Listen on listener.host and port, or accept on the socket(s) given (systemd's,
        or the parent's in an intake worker); `serving` False: from `serve` on."""
        loop = asyncio.get_running_loop()
        cfg = self.settings.listener
        # A burst of as many clients as may be connected waits in the kernel's queue
        # instead of being dropped (each drop costs the client a 1 s SYN retry).
        backlog = max(100, cfg.max_connections)
        if sock is None:
            self._servers = [await loop.create_server(
                self._protocol, cfg.host, cfg.port, reuse_address=True, backlog=backlog,
                start_serving=serving)]
        else:
            socks = [sock] if isinstance(sock, socket.socket) else list(sock)
            self._servers = [await loop.create_server(self._protocol, sock=s, backlog=backlog,
                                                      start_serving=serving) for s in socks]
        bound = self._servers[0].sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        log.info("listening on %s port %d", *self.address)

    def _protocol(self) -> RelaySMTP:
        cfg = self.settings.listener
        return RelaySMTP(
            self, data_size_limit=cfg.max_message_size, enable_SMTPUTF8=True,
            decode_data=False, hostname=self.hostname, ident="sysmail-relay ESMTP",
            timeout=cfg.idle_timeout, auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"], loop=asyncio.get_running_loop(),
        )

    async def serve(self) -> None:
        """Start accepting (after `start(serving=False)`)."""
        for server in self._servers:
            await server.start_serving()

    # --- connection policy -------------------------------------------------------------

    def admit(self, session: RelaySMTP, peer: Any) -> str | None:
        """None to admit, else the reply that refuses the connection."""
        host = peer[0] if isinstance(peer, tuple) else None
        try:
            ip = ipaddress.ip_address(host) if host else None
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        cfg = self.settings.listener
        if ip is None or not any(ip in net for net in cfg.allowed_networks):
            self.metrics.messages_rejected.labels("network").inc()
            log.warning("refused connection from %s: not in listener.allowed_networks", host)
            return (f"554 5.7.1 {self.hostname} does not relay for {host}: "
                    "the address is not in listener.allowed_networks")
        if not self.slots.take(cfg.max_connections):
            self.metrics.messages_rejected.labels("connections").inc()
            log.warning("refused connection from %s: listener.max_connections (%d) reached",
                        host, cfg.max_connections)
            return "421 4.7.0 Too many connections, try again later"
        self._sessions.add(session)
        self.metrics.smtp_sessions.set(len(self._sessions))
        return None

    def forget(self, session: RelaySMTP) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            self.slots.give()
        self.metrics.smtp_sessions.set(len(self._sessions))

    def postmaster(self) -> str | None:
        """Where mail to `<postmaster>` (no domain) goes: queue.notify, else the system
        address; None when neither is set (then it is passed on as it came)."""
        return self.settings.queue.notify or self.settings.system_account.address

    def better_reply(self, status: str) -> str:
        """Give aiosmtpd's stock replies enhanced status codes and a reason."""
        limit = self.settings.listener.max_message_size
        if status.startswith("552 Error"):
            self.metrics.messages_rejected.labels("size").inc()
            return f"552 5.3.4 Message too big: this relay accepts at most {limit} bytes"
        if status.startswith("500 Line too long"):
            self.metrics.messages_rejected.labels("line_length").inc()
            return (f"500 5.5.2 Line too long: this relay accepts lines of up to "
                    f"{RelaySMTP.line_length_limit} octets")
        if status.startswith("538 "):
            return "502 5.5.1 AUTH not offered: this relay takes mail without authentication"
        return _STOCK.get(status, status)

    # --- one message -------------------------------------------------------------------

    async def receive(self, session: Session, envelope: Envelope, message: Incoming) -> str:
        """Queue a message received into the spool: 250 once it is durable, else 451.

        The spool keeps the client's bytes as they came; the rewrite for the account
        as it is then is applied when the message is sent (`as_received`)."""
        qid = message.queue_id
        peer_ip = str(session.peer[0]) if isinstance(session.peer, tuple) else "unknown"
        env = SpoolEnvelope(
            id=qid, sender="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            mail_from=self.settings.system_account.address,
            recipients=[Recipient(a, options=o.split()) for a, o in
                        zip(envelope.rcpt_tos, envelope.rcpt_options, strict=True)],
            mail_options=list(envelope.mail_options), size=message.size, client=peer_ip,
            subject=subject_of(message.head), helo=session.host_name,
            protocol="UTF8SMTP" if envelope.smtp_utf8 else
            ("ESMTP" if session.extended_smtp else "SMTP"), as_received=True)
        # Shielded: if the client goes away meanwhile, a message that reaches the disk is
        # still handed to the scheduler (the client, without a 250, may send it again).
        queued = asyncio.ensure_future(self._queue(env, message))
        queued.add_done_callback(_retrieve)
        try:
            await asyncio.shield(queued)
        except SpoolError as e:
            self.metrics.messages_rejected.labels("spool").inc()
            log.error("%s: not queued, client told to retry (451): %s", qid, e)
            return "451 4.3.0 Could not queue the message on disk; try again later"
        return f"250 2.0.0 OK queued as {qid}"

    async def _queue(self, env: SpoolEnvelope, message: Incoming) -> None:
        await self.spool.commit(env, message)
        self.metrics.messages_received.inc()
        log.info("%s: queued from=<%s> client=%s size=%d nrcpt=%d", env.id, env.sender,
                 env.client, env.size, len(env.recipients))
        self.on_queued(env)

    # --- stopping ----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    async def drain(self, grace: float) -> None:
        """Close idle sessions now; let transactions in flight finish for `grace` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._sessions:
            final = loop.time() >= deadline
            for session in list(self._sessions):
                in_transaction = session.envelope is not None and session.envelope.mail_from
                if session.transport is not None and (final or not in_transaction):
                    writer = cast(asyncio.WriteTransport, session.transport)
                    writer.write(b"421 4.3.2 The relay is shutting down\r\n")
                    writer.close()
            if final:
                break
            await asyncio.sleep(0.05)  # shutdown only: wait for transactions to complete
        for server in self._servers:
            await server.wait_closed()


SUBJECT_CHARS = 200
"""The Subject kept for logs and the status page is cut to this many characters."""


def subject_of(head: bytes | bytearray) -> str | None:
    """The Subject of a message from its first bytes (`Incoming.head`, bounded), cut short."""
    value = header_value(head, "Subject")
    return None if value is None else value[:SUBJECT_CHARS]


def _retrieve(task: asyncio.Task[None]) -> None:
    """Read a shielded task's outcome, so a failure after the client left is not 'unretrieved'."""
    if not task.cancelled():
        task.exception()


_STOCK = {
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
}
