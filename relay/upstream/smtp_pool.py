"""The pool of sessions to one SMTP server. Implements `Upstream`.

`SmtpUpstream` keeps up to `pool_size` sessions (relay.upstream.smtp) and sends
many messages over each, one transaction at a time per session (RSET after a
refused one), reconnects when the server closed an idle connection, closes one
left unused for IDLE_CLOSE seconds, logs in by POP before SMTP when configured
(once per `window`, shared by every session), and asks its `Pacing`
(relay.upstream.pacing) before each message: rate limits, the pause after refused
logins, the slow-down a server asks for. In a fleet it asks the limits shared with the
other relays too (relay.upstream.shared): before each message, and for a lease on a
connection before it opens one; an idle connection is kept only briefly, and closed at
once when other relays wait for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from relay.errors import AuthenticationFailure, DeliveryFailure, TemporaryFailure
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.upstream.base import Outcome, Outgoing
from relay.upstream.message import Body
from relay.upstream.network import TlsContexts
from relay.upstream.pacing import Pacing, RateLimited
from relay.upstream.pop_before_smtp import pop_before_smtp
from relay.upstream.shared import SharedLimits
from relay.upstream.smtp import Session, answered

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth

__all__ = ["IDLE_CLOSE", "RateLimited", "SmtpUpstream"]

log = logging.getLogger("relay.upstream")

IDLE_CLOSE = 15.0
"""Seconds an unused connection stays open for the next message."""


class SmtpUpstream:
    """A pool of sessions to one server, with pacing. Implements `Upstream`."""

    wants_data = True

    def __init__(self, name: str, server: ServerSettings, metrics: Metrics,
                 hostname: str, oauth: OAuth | None = None,
                 shared: SharedLimits | None = None) -> None:
        self.name = name
        self.server = server
        self.metrics = metrics
        self.hostname = hostname
        self.oauth = oauth
        self.pacing = Pacing(name, server)
        self._contexts = TlsContexts(server, key=f"servers.{name}.ca_file")
        self.shared = shared
        self._leases: dict[Session, object] = {}
        """The shared limits' lease of each open session (in a fleet)."""
        self._slots = asyncio.Semaphore(server.pool_size)
        """One per transaction sending: at most pool_size at once, one per session."""
        self._idle: list[Session] = []
        self._sessions: set[Session] = set()
        """Every session opened and not closed yet."""
        self._opening = 0
        self._changed = asyncio.Event()
        """Set when a session becomes idle, or one is closed."""
        self._pop_lock = asyncio.Lock()
        self._pop_at = 0.0  # monotonic time of the last successful POP login

    def not_before(self) -> float:
        if self.shared is not None:
            return max(self.pacing.not_before(), self.shared.not_before())
        return self.pacing.not_before()

    # --- POP before SMTP ----------------------------------------------------------------

    async def _ensure_pop_login(self) -> None:
        """A POP login younger than `window` before every transaction; one at a time."""
        pop = self.server.pop_before_smtp
        if pop is None:
            return
        async with self._pop_lock:  # concurrent deliveries share one login
            if time.monotonic() - self._pop_at < pop.window:
                return
            self.pacing.check_paused()  # a login refused while this one waited paused it
            epoch = self.pacing.auth_epoch
            try:
                answer = await pop_before_smtp(self.name, self.server)
            except DeliveryFailure as failure:
                self.metrics.pop_before_smtp.labels(self.name, "failed").inc()
                if isinstance(failure, AuthenticationFailure):
                    self._auth_failed("POP", failure, epoch)
                raise
            logged_in = time.monotonic()
            self.pacing.auth_accepted()
            self.metrics.pop_before_smtp.labels(self.name, "ok").inc()
            log.info("%s: POP before SMTP login to %s ok (%s)", self.name, pop.host, answer)
            if pop.wait:
                await asyncio.sleep(pop.wait)
            self._pop_at = logged_in

    # --- sessions ----------------------------------------------------------------------

    async def _new_session(self) -> Session:
        session = Session(self.name, self.server, self.hostname, oauth=self.oauth,
                          contexts=self._contexts)
        method = (self.server.auth.method if self.server.auth
                  else "XOAUTH2" if self.server.oauth else "none")
        self.pacing.check_paused()  # never log in while paused, even for a waiting delivery
        epoch = self.pacing.auth_epoch
        lease = await self.shared.connect() if self.shared is not None else None
        self._opening += 1
        try:
            await session.open()
        except AuthenticationFailure as failure:
            await session.quit()
            self._auth_failed(method, failure, epoch)
            raise
        except BaseException:
            await session.quit()
            raise
        finally:
            self._opening -= 1
            self._changed.set()
            if lease is not None and not session.connected:
                self._disconnect(lease)  # not opened: the lease goes back
        self.pacing.auth_accepted()
        if lease is not None:
            self._leases[session] = lease
        self._sessions.add(session)
        self.metrics.upstream_sessions.labels(self.name).set(len(self._sessions))
        return session

    def _auth_failed(self, method: str, failure: DeliveryFailure, epoch: int) -> None:
        """Counted in the metric always, towards a pause as `Pacing` decides."""
        self.metrics.auth_failures.labels(self.name, method).inc()
        self.pacing.auth_refused(failure, epoch)

    def _take_idle(self) -> Session | None:
        while self._idle:
            session = self._idle.pop()
            if session.idle_handle is not None:
                session.idle_handle.cancel()
            if session.connected:
                return session
            self._closed(session)
        return None

    async def _session(self) -> tuple[Session, bool]:
        """A session for one transaction, and whether it was in use before: an idle one,
        else a new one while there are fewer than pool_size."""
        while True:
            if (session := self._take_idle()) is not None:
                return session, True
            if len(self._sessions) + self._opening < self.server.pool_size:
                return await self._new_session(), False
            self._changed.clear()
            await self._changed.wait()

    def _give_back(self, session: Session) -> None:
        """After a transaction: pooled while it is connected, closed after IDLE_CLOSE."""
        if not session.connected:
            self._closed(session)
            return
        idle = IDLE_CLOSE if self.shared is None else min(IDLE_CLOSE, self.shared.idle_for())
        if idle <= 0:  # another relay waits for a connection: this one goes back now
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(self._retire(session)))
            return
        session.idle_handle = asyncio.get_running_loop().call_later(
            idle, lambda: asyncio.ensure_future(self._expire(session)))
        self._idle.append(session)
        self._changed.set()

    async def _expire(self, session: Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
            await session.quit()
            self._closed(session)

    async def _retire(self, session: Session) -> None:
        await session.quit()
        self._closed(session)

    def _disconnect(self, lease: object) -> None:
        assert self.shared is not None
        self.shared.disconnect(lease)

    def _closed(self, session: Session) -> None:
        session.client.close()
        if (lease := self._leases.pop(session, None)) is not None:
            self._disconnect(lease)
        if session in self._sessions:
            self._sessions.discard(session)
            self.metrics.upstream_sessions.labels(self.name).set(len(self._sessions))
            self._changed.set()

    # --- delivering --------------------------------------------------------------------

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        self.pacing.check(message)
        body = await Body.of(message)
        async with self._slots:
            try:
                self.pacing.check(message)
                await self._ensure_pop_login()
                tried = self.pacing.count(message)
                try:
                    outcomes = await self._send(message, body)
                except BaseException:
                    self.pacing.uncount(tried)  # nothing was taken: no limit is used up
                    raise
            except DeliveryFailure as failure:
                self.pacing.answered(failure.code, failure.reply)
                raise
        for outcome in outcomes:
            self.pacing.answered(outcome.failure.code if outcome.failure else 250,
                                 outcome.reply)
        return outcomes

    async def _send(self, message: Outgoing, body: Body) -> list[Outcome]:
        """In a fleet, the message is counted against the shared limits once it has its
        session (so that it goes at once: the upstream sees the pace Redis counted)."""
        session, pooled = await self._session()
        if self.shared is None:
            return await self._send_on(session, pooled, message, body)
        try:
            taken = await self.shared.take(message)
        except BaseException:
            self._give_back(session)
            raise
        try:
            return await self._send_on(session, pooled, message, body)
        except BaseException:
            self.shared.give_back(taken)  # nothing was taken: no limit is used up
            raise

    async def _send_on(self, session: Session, pooled: bool, message: Outgoing,
                       body: Body) -> list[Outcome]:
        """One transaction on a pooled session, or on a new one when the pooled one went
        stale (closed by the server while idle, or by a failure of the transaction before)."""
        if pooled:
            try:
                return await self._transaction(session, message, body)
            except TemporaryFailure as failure:
                stale = failure.code in (None, 421) and failure.stage == "MAIL FROM"
                if not stale:
                    raise
            session = await self._new_session()  # its slot is still held: nothing was sent
        return await self._transaction(session, message, body)

    async def _transaction(self, session: Session, message: Outgoing,
                           body: Body) -> list[Outcome]:
        """Run it; keep the session when it is still good (the server answered), else close."""
        try:
            outcomes = await session.transaction(message, body)
        except DeliveryFailure as failure:
            if answered(failure) and session.connected:
                self._give_back(session)
            else:
                self._closed(session)
            raise
        except BaseException:  # cancelled: whatever it was waiting for, the session is unusable
            self._closed(session)
            raise
        self._give_back(session)
        return outcomes

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            if session.idle_handle is not None:
                session.idle_handle.cancel()
            await session.quit()
            self._closed(session)
