"""The listener: applications hand their mail to it over SMTP, unauthenticated.

`Listener` serves aiosmtpd sessions (relay.listener.protocol, with the hooks of
relay.listener.handler) with `loop.create_server` in the daemon's own loop, on
`listener.host`/`listener.port` or on a socket it is given. It owns the
connection policy: connections are accepted only from `listener.allowed_networks`
(554 otherwise) and up to `listener.max_connections` (421 beyond); SIZE,
recipients per message and idle time are bounded. It turns a received message
into a spool entry: only when the spool has made the message durable does the
client get 250; if the write fails the client gets 451 4.3.0, and a message that
is too big or interrupted leaves nothing behind. The client's bytes are kept
unchanged (the rewrite is applied when the message is sent). On stopping, idle
sessions are closed at once and transactions in flight may finish.

Public interface (the daemon's): `Listener(settings, spool, metrics, on_queued)`,
`await start(sock=None)`, `address`, `stop_accepting()`, `await drain(grace)`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from aiosmtpd.smtp import Envelope, Session

from relay.errors import SpoolError
from relay.listener.addresses import dsn_parameters, plain_angle_addr
from relay.listener.handler import IntakeHandler
from relay.listener.protocol import RelaySMTP
from relay.listener.replies import (
    SHUTTING_DOWN,
    STOCK,
    line_too_long,
    too_big,
    with_enhanced_codes,
)
from relay.listener.slots import LocalSlots, SharedSlots
from relay.metrics import IntakeMetrics
from relay.rewrite import header_value
from relay.settings import Settings
from relay.spool import Envelope as SpoolEnvelope
from relay.spool import Incoming, Recipient, Spool, new_queue_id

__all__ = ["IntakeHandler", "Listener", "RelaySMTP", "dsn_parameters", "plain_angle_addr",
           "subject_of", "with_enhanced_codes"]

log = logging.getLogger("relay.listener")


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

    # --- envelope policy (IntakeHandler's) ---------------------------------------------

    def max_recipients(self) -> int:
        return self.settings.listener.max_recipients

    def postmaster(self) -> str | None:
        """Where mail to `<postmaster>` (no domain) goes: queue.notify, else the system
        address; None when neither is set (then it is passed on as it came)."""
        return self.settings.queue.notify or self.settings.system_account.address

    def rejected(self, reason: str) -> None:
        self.metrics.messages_rejected.labels(reason).inc()

    def better_reply(self, status: str) -> str:
        """Give aiosmtpd's stock replies enhanced status codes and a reason."""
        if status.startswith("552 Error"):
            self.rejected("size")
            return too_big(self.settings.listener.max_message_size)
        if status.startswith("500 Line too long"):
            self.rejected("line_length")
            return line_too_long(RelaySMTP.line_length_limit)
        return STOCK.get(status, status)

    # --- one message -------------------------------------------------------------------

    def incoming(self) -> Incoming:
        """A new spool entry for the message a session is about to receive."""
        return self.spool.receive(new_queue_id())

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
            self.rejected("spool")
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
                    writer.write(SHUTTING_DOWN)
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
