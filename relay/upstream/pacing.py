"""How fast one SMTP server is sent to: rate limits, the pause after refused logins,
and the slow-down a server asks for.

`Pacing` keeps, for one server, the messages and recipients tried within
`rate_limit`'s interval and the last day (`max_recipients_per_day`), counted when
a message is tried so that the limits hold with messages in flight, and given back
when the attempt failed as a whole. It pauses the server after refused logins: 3
in a row pause it for 1 minute; after a pause one more refused login pauses it
again, each pause twice as long as the one before (at most an hour); an accepted
login starts over. Logins already in flight when a pause begins were tried with
the same credentials: their refusals never start or lengthen a pause (the pool
still counts them in `relay_auth_failures_total`). A 4xx that says "too many"
pauses the server for 30 s, doubling while it repeats (at most 15 minutes); an HTTP
API's 429 or 503 pauses it for its Retry-After (at most RETRY_AFTER_MAX), or like a
"too many" without one (`wait_asked`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from datetime import UTC, datetime

from relay.errors import DeliveryFailure, Held
from relay.settings import ServerSettings
from relay.upstream.base import Outgoing, explain, slow_down_requested

log = logging.getLogger("relay.upstream")

AUTH_FAILURES_BEFORE_PAUSE = 3
"""Refused logins in a row before the first pause; after a pause, one more pauses again."""
AUTH_PAUSE_FIRST = 60.0
AUTH_PAUSE_MAX = 3600.0
RETRY_AFTER_MAX = 3600.0
"""The longest pause a server's Retry-After is taken for."""
Tried = tuple[float, int]
"""When a message was tried, and its number of recipients."""


class RateLimited(Held):
    """Sending now would exceed a limit; try again at `retry_at`."""

    def __init__(self, reply: str, retry_at: float) -> None:
        super().__init__(reply, stage="rate limit", retry_at=retry_at)


class Pacing:
    """The limits and pauses of one server (`name`)."""

    def __init__(self, name: str, server: ServerSettings) -> None:
        self.name = name
        self.server = server
        self.auth_failures = 0
        """Refused logins in a row, each counted once (not those in flight at a pause)."""
        self.auth_pauses = 0
        """Authentication pauses in a row: the next one lasts 60 s * 2**this."""
        self.auth_epoch = 0
        """Incremented when an authentication pause begins; a login remembers the value it
        started under, so that one refused before the pause began is not counted again."""
        self.paused_until = 0.0
        self._pause_reason = ""
        self._slowdown = 0.0
        self._sent: collections.deque[float] = collections.deque()
        self._rcpts: collections.deque[Tried] = collections.deque()

    def not_before(self) -> float:
        return max(self.paused_until, self._rate_ready_at(1))

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

    def check_paused(self) -> None:
        if self.paused_until > time.time():
            raise RateLimited(f"not trying {self.name} before "
                              f"{_clock(self.paused_until)}: {self._pause_reason}",
                              self.paused_until)

    def check(self, message: Outgoing) -> None:
        """Raise RateLimited when `message` may not be tried now."""
        now = time.time()
        self.check_paused()
        ready = self._rate_ready_at(len(message.recipients))
        if ready > now:
            raise RateLimited(f"{self.name}: rate_limit or max_recipients_per_day reached; "
                              f"next message at {_clock(ready)}", ready)

    def count(self, message: Outgoing) -> Tried:
        """Count a message against the limits when it is tried, so that they hold with
        messages in flight; only while a limit needs it."""
        tried = (time.time(), len(message.recipients))
        if self.server.rate_limit is not None:
            self._sent.append(tried[0])
        if self.server.max_recipients_per_day is not None:
            self._rcpts.append(tried)
        return tried

    def uncount(self, tried: Tried) -> None:
        """The attempt failed as a whole: nothing was taken, it uses up no limit."""
        with contextlib.suppress(ValueError):  # already aged out of the window
            self._sent.remove(tried[0])
        with contextlib.suppress(ValueError):
            self._rcpts.remove(tried)

    def _pause(self, seconds: float, reason: str) -> None:
        self.paused_until = time.time() + seconds
        self._pause_reason = reason
        log.warning("not sending to %s for %.0f s: %s", self.name, seconds, reason)

    def auth_refused(self, failure: DeliveryFailure, epoch: int) -> None:
        """A login started under `epoch` was refused: towards a pause only when no pause
        began while it was in flight."""
        if epoch != self.auth_epoch:
            return  # tried before the pause now running: that pause already answers it
        self.auth_failures += 1
        if self.auth_pauses == 0 and self.auth_failures < AUTH_FAILURES_BEFORE_PAUSE:
            return
        doublings = min(self.auth_pauses, 16)  # an hour long before; no float overflow
        seconds = min(AUTH_PAUSE_MAX, AUTH_PAUSE_FIRST * 2**doublings)
        self.auth_pauses += 1
        self.auth_epoch += 1
        self._pause(seconds, f"{self.auth_failures} authentication failures in a row "
                             f"(pausing so the account is not locked); last: {failure.reply}")

    def auth_accepted(self) -> None:
        self.auth_failures = 0
        self.auth_pauses = 0

    def answered(self, code: int | None, reply: str) -> None:
        """What the server answered a message (or a recipient): slow down when asked."""
        if code is not None and code // 100 in (4, 5) and slow_down_requested(f"{code} {reply}"):
            self._slowdown = min(900.0, max(30.0, self._slowdown * 2))
            self._pause(self._slowdown, f"the server asked to slow down: {explain(reply)}")
        elif code is not None and code // 100 == 2:
            self._slowdown = 0.0


    def wait_asked(self, seconds: float | None, reason: str) -> None:
        """An HTTP API answered 429 / 503 / 504: pause for its Retry-After (`seconds`), or,
        without one, as for a 4xx that says "too many" (30 s doubling, at most 15 min)."""
        if seconds is None:
            self._slowdown = min(900.0, max(30.0, self._slowdown * 2))
            self._pause(self._slowdown, reason)
        elif seconds > 0:
            self._pause(min(seconds, RETRY_AFTER_MAX), f"{reason} (Retry-After: {seconds:g} s)")


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%SZ")
