"""The pool of sessions to one SMTP server, and its pacing. Implements `Upstream`.

`SmtpUpstream` keeps up to `pool_size` sessions (relay.upstream.smtp) and sends
many messages over each (one transaction per message, RSET after a refused one),
reconnects when the server closed an idle connection, and paces itself: the
configured rate limits, a pause after repeated authentication failures (so the
relay never locks the account), and a slow-down when the server says "too many".

The authentication pause counts once per pause: 3 refused logins in a row pause the
server for 1 minute; after a pause one more refused login pauses it again, each pause
twice as long as the one before (at most an hour); an accepted login starts over.
Logins already in flight when a pause begins were tried with the same credentials: their
refusals are counted in `relay_auth_failures_total` but never start or lengthen a pause.

At most `pool_size` transactions are sending at once, one per session. When the
server offers PIPELINING, a transaction that has written its final dot stops
counting: the next message's commands may follow it on the same session while it
waits for its reply, so each message costs one round trip instead of two.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from relay.errors import (
    AuthenticationFailure,
    DeliveryFailure,
    Held,
    TemporaryFailure,
)
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.upstream.base import Outcome, Outgoing, explain, slow_down_requested
from relay.upstream.body import Body

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth
from relay.upstream.smtp import Session, pop_before_smtp

log = logging.getLogger("relay.upstream")

IDLE_CLOSE = 15.0
"""Seconds an unused connection stays open for the next message."""
AUTH_FAILURES_BEFORE_PAUSE = 3
"""Refused logins in a row before the first pause; after a pause, one more pauses again."""
AUTH_PAUSE_FIRST = 60.0
AUTH_PAUSE_MAX = 3600.0


class RateLimited(Held):
    """Sending now would exceed a limit; try again at `retry_at`."""

    def __init__(self, reply: str, retry_at: float) -> None:
        super().__init__(reply, stage="rate limit", retry_at=retry_at)


class SmtpUpstream:
    """A pool of sessions to one server, with pacing. Implements `Upstream`."""

    wants_data = True

    def __init__(self, name: str, server: ServerSettings, metrics: Metrics,
                 hostname: str, oauth: OAuth | None = None) -> None:
        self.name = name
        self.server = server
        self.metrics = metrics
        self.hostname = hostname
        self.oauth = oauth
        self._slots = asyncio.Semaphore(server.pool_size)
        self._idle: list[Session] = []
        self._chainable: list[Session] = []
        """Sessions whose transaction has sent its message and waits for the reply only."""
        self._sessions: set[Session] = set()
        """Every session opened and not closed yet."""
        self._opening = 0
        self._changed = asyncio.Event()
        """Set when a session becomes idle or chainable, or one is closed."""
        self._auth_failures = 0
        """Refused logins in a row, each counted once (not those in flight at a pause)."""
        self._auth_pauses = 0
        """Authentication pauses in a row: the next one lasts 60 s * 2**this."""
        self._auth_epoch = 0
        """Incremented when an authentication pause begins; a login remembers the value it
        started under, so that one refused before the pause began is not counted again."""
        self._paused_until = 0.0
        self._slowdown = 0.0
        self._sent: collections.deque[float] = collections.deque()
        self._rcpts: collections.deque[tuple[float, int]] = collections.deque()
        self._pop_lock = asyncio.Lock()
        self._pop_at = 0.0  # monotonic time of the last successful POP login

    # --- pacing ------------------------------------------------------------------------

    def not_before(self) -> float:
        return max(self._paused_until, self._rate_ready_at(1))

    def _rate_ready_at(self, recipients: int) -> float:
        now = time.time()
        ready = 0.0
        limit = self.server.rate_limit
        if limit is not None:
            while self._sent and self._sent[0] <= now - limit.seconds:
                self._sent.popleft()
            if len(self._sent) >= limit.count:
                ready = self._sent[-limit.count] + limit.seconds
        quota = self.server.max_recipients_per_day
        if quota is not None:
            while self._rcpts and self._rcpts[0][0] <= now - 86400:
                self._rcpts.popleft()
            used = sum(n for _, n in self._rcpts)
            if used + recipients > quota and self._rcpts:
                freed, i = used, 0
                while freed + recipients > quota and i < len(self._rcpts):
                    freed -= self._rcpts[i][1]
                    i += 1
                ready = max(ready, self._rcpts[i - 1][0] + 86400)
        return ready

    def _check_paused(self) -> None:
        if self._paused_until > time.time():
            raise RateLimited(f"not trying {self.name} before "
                              f"{_clock(self._paused_until)}: {self._pause_reason}",
                              self._paused_until)

    def _check_pace(self, message: Outgoing) -> None:
        now = time.time()
        self._check_paused()
        ready = self._rate_ready_at(len(message.recipients))
        if ready > now:
            raise RateLimited(f"{self.name}: rate_limit or max_recipients_per_day reached; "
                              f"next message at {_clock(ready)}", ready)

    def _count(self, message: Outgoing) -> tuple[float, int]:
        """Count a message against the limits when it is tried, so that they hold with
        messages in flight; only while a limit needs it."""
        tried = (time.time(), len(message.recipients))
        if self.server.rate_limit is not None:
            self._sent.append(tried[0])
        if self.server.max_recipients_per_day is not None:
            self._rcpts.append(tried)
        return tried

    def _uncount(self, tried: tuple[float, int]) -> None:
        with contextlib.suppress(ValueError):  # already aged out of the window
            self._sent.remove(tried[0])
        with contextlib.suppress(ValueError):
            self._rcpts.remove(tried)

    _pause_reason = ""

    def _pause(self, seconds: float, reason: str) -> None:
        self._paused_until = time.time() + seconds
        self._pause_reason = reason
        log.warning("not sending to %s for %.0f s: %s", self.name, seconds, reason)

    # --- POP before SMTP ----------------------------------------------------------------

    async def _ensure_pop_login(self) -> None:
        """A POP login younger than `window` before every transaction; one at a time."""
        pop = self.server.pop_before_smtp
        if pop is None:
            return
        async with self._pop_lock:  # concurrent deliveries share one login
            if time.monotonic() - self._pop_at < pop.window:
                return
            self._check_paused()  # a login refused while this one waited paused the server
            epoch = self._auth_epoch
            try:
                answer = await pop_before_smtp(self.name, self.server)
            except DeliveryFailure as failure:
                self.metrics.pop_before_smtp.labels(self.name, "failed").inc()
                if isinstance(failure, AuthenticationFailure):
                    self._auth_failed("POP", failure, epoch)
                raise
            logged_in = time.monotonic()
            self._auth_accepted()
            self.metrics.pop_before_smtp.labels(self.name, "ok").inc()
            log.info("%s: POP before SMTP login to %s ok (%s)", self.name, pop.host, answer)
            if pop.wait:
                await asyncio.sleep(pop.wait)
            self._pop_at = logged_in

    # --- sessions ----------------------------------------------------------------------

    async def _new_session(self) -> Session:
        session = Session(self.name, self.server, self.hostname, oauth=self.oauth)
        method = (self.server.auth.method if self.server.auth
                  else "XOAUTH2" if self.server.oauth else "none")
        self._check_paused()  # never log in while paused, even for a delivery already waiting
        epoch = self._auth_epoch
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
        self._auth_accepted()
        self._sessions.add(session)
        self.metrics.upstream_sessions.labels(self.name).set(len(self._sessions))
        return session

    def _auth_failed(self, method: str, failure: DeliveryFailure, epoch: int) -> None:
        """A login started under `epoch` was refused: counted in the metric always, towards
        a pause only when no pause began while it was in flight."""
        self.metrics.auth_failures.labels(self.name, method).inc()
        if epoch != self._auth_epoch:
            return  # tried before the pause now running: that pause already answers it
        self._auth_failures += 1
        if self._auth_pauses == 0 and self._auth_failures < AUTH_FAILURES_BEFORE_PAUSE:
            return
        doublings = min(self._auth_pauses, 16)  # an hour long before; no float overflow
        seconds = min(AUTH_PAUSE_MAX, AUTH_PAUSE_FIRST * 2**doublings)
        self._auth_pauses += 1
        self._auth_epoch += 1
        self._pause(seconds, f"{self._auth_failures} authentication failures in a row "
                             f"(pausing so the account is not locked); last: {failure.reply}")

    def _auth_accepted(self) -> None:
        self._auth_failures = 0
        self._auth_pauses = 0

    def _take_idle(self) -> Session | None:
        while self._idle:
            session = self._idle.pop()
            if session.idle_handle is not None:
                session.idle_handle.cancel()
            if session.connected:
                return session
            self._closed(session)
        return None

    def _take_chainable(self) -> Session | None:
        while self._chainable:
            session = self._chainable.pop()
            if session.connected:
                return session
        return None

    def _chain(self, session: Session, release: Callable[[], None]) -> None:
        """The session's transaction has sent its message: the next may follow it."""
        release()
        if session.connected:
            self._chainable.append(session)
            self._changed.set()

    async def _session(self) -> tuple[Session, bool]:
        """A session for one transaction, and whether it was in use before: an idle one,
        a new one while there are fewer than pool_size, else one whose transaction
        waits for its final reply."""
        while True:
            if (session := self._take_idle()) is not None:
                return session, True
            if len(self._sessions) + self._opening < self.server.pool_size:
                return await self._new_session(), False
            if (session := self._take_chainable()) is not None:
                return session, True
            self._changed.clear()
            await self._changed.wait()

    def _give_back(self, session: Session) -> None:
        """After a transaction: pooled when it was the session's last one."""
        if session in self._chainable:
            self._chainable.remove(session)
        if not session.connected:
            self._closed(session)
            return
        if session.busy:
            return  # the transaction after it gives the session back
        session.idle_handle = asyncio.get_running_loop().call_later(
            IDLE_CLOSE, lambda: asyncio.ensure_future(self._expire(session)))
        self._idle.append(session)
        self._changed.set()

    async def _expire(self, session: Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
            await session.quit()
            self._closed(session)

    def _closed(self, session: Session) -> None:
        session.client.close()
        if session in self._chainable:
            self._chainable.remove(session)
        if session in self._sessions:
            self._sessions.discard(session)
            self.metrics.upstream_sessions.labels(self.name).set(len(self._sessions))
            self._changed.set()

    # --- delivering --------------------------------------------------------------------

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        self._check_pace(message)
        body = await Body.of(message)
        await self._slots.acquire()
        slot = _Slot(self._slots)
        try:
            self._check_pace(message)
            await self._ensure_pop_login()
            tried = self._count(message)
            try:
                outcomes = await self._send(message, body, slot.release)
            except BaseException:
                self._uncount(tried)  # nothing was taken: it does not use up the limits
                raise
        except DeliveryFailure as failure:
            self._after(failure.code, failure.reply)
            raise
        finally:
            slot.release()
        for outcome in outcomes:
            self._after(outcome.failure.code if outcome.failure else 250, outcome.reply)
        return outcomes

    async def _send(self, message: Outgoing, body: Body,
                    release: Callable[[], None]) -> list[Outcome]:
        """One transaction on a pooled session, or on a new one when the pooled one went
        stale (closed by the server while idle, or by a failure of the transaction before)."""
        session, pooled = await self._session()
        if pooled:
            try:
                return await self._transaction(session, message, body, release)
            except TemporaryFailure as failure:
                stale = failure.code in (None, 421) and failure.stage == "MAIL FROM"
                if not stale:
                    raise
            session = await self._new_session()  # its slot is still held: nothing was sent
        return await self._transaction(session, message, body, release)

    async def _transaction(self, session: Session, message: Outgoing,
                           body: Body, release: Callable[[], None]) -> list[Outcome]:
        """Run it; keep the session when it is still good (the server answered), else close."""
        session.busy += 1
        try:
            outcomes = await session.transaction(
                message, body, sent=lambda: self._chain(session, release))
        except DeliveryFailure as failure:
            session.busy -= 1
            if failure.code is not None and failure.code != 421 and session.connected:
                self._give_back(session)
            else:
                self._closed(session)
            raise
        except BaseException:  # cancelled: whatever it was waiting for, the session is unusable
            session.busy -= 1
            self._closed(session)
            raise
        session.busy -= 1
        self._give_back(session)
        return outcomes

    def _after(self, code: int | None, reply: str) -> None:
        if code is not None and code // 100 == 4 and slow_down_requested(f"{code} {reply}"):
            self._slowdown = min(900.0, max(30.0, self._slowdown * 2))
            self._pause(self._slowdown, f"the server asked to slow down: {explain(reply)}")
        elif code is not None and code // 100 == 2:
            self._slowdown = 0.0

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            if session.idle_handle is not None:
                session.idle_handle.cancel()
            await session.quit()
            self._closed(session)


class _Slot:
    """One of the pool's sending slots, given back once."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%SZ")
