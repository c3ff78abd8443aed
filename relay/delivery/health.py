"""What the delivery scheduler knows about each upstream server: why mail waits.

One `ServerHealth` per server, fed by the result of every attempt: the last
success, the last error with its time, and whether the server failed the last
attempt or withheld it (OAuth authorization not granted). With the account's
Active flag and the upstream's pause (`Upstream.not_before`), it gives the
server's state:

    ok            the last attempt reached the server (or none was made yet)
    failing       the last attempt failed: connection, timeout, 4xx, login refused
    paused        logins were refused repeatedly: nothing is tried before `paused_until`
    not granted   OAuth authorization is missing: the mail waits for a sign-in
    inactive      the system account is inactive: mail is accepted and held

`Servers` keeps one per server, with its relay_upstream_up gauge. Held mail is mail
that waits for the operator: `inactive`, `not granted` and
`paused` (HELD_STATES), and the same definition is used by `status`, `/status`,
the page, `queue list` and relay_queue_messages{state="held"}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from relay.errors import AuthenticationFailure, DeliveryFailure, Held

OK, FAILING, PAUSED, NOT_GRANTED, INACTIVE = "ok", "failing", "paused", "not granted", "inactive"
HELD_STATES = frozenset({PAUSED, NOT_GRANTED, INACTIVE})
_OAUTH_STAGES = ("OAuth token", "OAuth refresh")


def clock(epoch: float) -> str:
    """HH:MM:SS in local time."""
    return time.strftime("%H:%M:%S", time.localtime(epoch))


@dataclass
class ServerHealth:
    """The outcome of the latest attempts through one server."""

    server: str
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failing: bool = False
    not_granted: bool = False
    auth_refused: bool = False
    """The last failure was a refused login (a pause that follows is an authentication pause)."""

    def succeeded(self, at: float) -> None:
        self.last_success = at
        self.failing = self.not_granted = self.auth_refused = False

    def answered(self) -> None:
        """The server answered the attempt, refusing the message for good (5xx)."""
        self.failing = self.not_granted = self.auth_refused = False

    def failed(self, failure: DeliveryFailure, at: float) -> None:
        """A failure of the whole attempt or of one recipient that the server deferred."""
        if isinstance(failure, Held) and failure.stage not in _OAUTH_STAGES:
            return  # rate limit, pause: not an attempt, says nothing new about the server
        self.last_error, self.last_error_at = failure.reply, at
        if isinstance(failure, Held):
            self.not_granted = True
            return
        self.not_granted = False
        self.failing = True
        self.auth_refused = isinstance(failure, AuthenticationFailure)

    def state(self, *, active: bool, paused_until: float, now: float) -> str:
        if not active:
            return INACTIVE
        if self.not_granted:
            return NOT_GRANTED
        if paused_until > now and self.auth_refused:
            return PAUSED
        return FAILING if self.failing else OK

    def up(self, paused_until: float, now: float) -> bool:
        """relay_upstream_up: the server took the last attempt (the account's flag aside)."""
        return self.state(active=True, paused_until=paused_until, now=now) == OK

    def report(self, *, active: bool, paused_until: float, now: float,
               next_attempt: float | None) -> dict[str, Any]:
        """The server's part of /status (JSON); `describe` renders it. `next_attempt`:
        when the first waiting message is due (None: none waits)."""
        state = self.state(active=active, paused_until=paused_until, now=now)
        return {
            "server": self.server, "state": state, "held": state in HELD_STATES,
            "paused_until": paused_until if state == PAUSED else None,
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "last_success": self.last_success,
            "next_attempt": max(paused_until, next_attempt) if next_attempt else None,
        }


class Servers(dict[str, ServerHealth]):
    """Every server's `ServerHealth` by name, each made on first use with its
    relay_upstream_up gauge. `paused_until(name)`: the upstream's pause for that server
    (0: none)."""

    def __init__(self, gauge: Gauge, paused_until: Callable[[str], float]) -> None:
        super().__init__()
        self._gauge = gauge
        self._paused_until = paused_until

    def of(self, name: str) -> ServerHealth:
        found = self.get(name)
        if found is None:
            found = self[name] = ServerHealth(name)
            self._gauge.labels(name).set_function(
                lambda: float(found.up(self._paused_until(name), time.time())))
        return found

    def reports(self, sending: str, *, active: bool, paused_until: float,
                next_attempt: float | None) -> list[dict[str, Any]]:
        """Every server's `report`; `sending`'s with the pause and the next attempt."""
        now = time.time()
        return [health.report(active=active, now=now,
                              paused_until=paused_until if name == sending else 0.0,
                              next_attempt=next_attempt if name == sending else None)
                for name, health in self.items()]


def state_label(report: dict[str, Any]) -> str:
    """"paused until 14:03:10" for a paused server; the state's name otherwise."""
    if report["state"] == PAUSED and report.get("paused_until"):
        return f"paused until {clock(report['paused_until'])}"
    return str(report["state"])


def when(epoch: float | None) -> str:
    """A time for people: local date and time, or "never"."""
    if not epoch:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def describe(report: dict[str, Any]) -> list[str]:
    """A server's report as lines for `status`."""
    lines = [f"  {report['server']}: {state_label(report)}"]
    if report.get("last_error"):
        lines.append(f"    last error    {when(report['last_error_at'])}  {report['last_error']}")
    if report.get("next_attempt"):
        lines.append(f"    next attempt  {when(report['next_attempt'])}")
    lines.append(f"    last success  {when(report.get('last_success'))}")
    return lines
