"""Limits one server's account shares with other relays (relay.fleet implements it).

A `SmtpUpstream` or an `ApiUpstream` given `SharedLimits` asks them as well as its own
`Pacing` before each message (`take`, given back by `give_back` when the attempt failed as a whole,
so it uses up no limit) and before it opens a connection (`connect`, released by
`disconnect` when it closes; an idle one stays open `idle_for` seconds at most; an
API upstream holds a lease for each request it has in flight).
Each raises `RateLimited` (a `Held` failure: the message waits, no attempt counted)
with the time to try again. Without a fleet the pool has none and behaves as it
always has.
"""

from __future__ import annotations

from typing import Protocol

from relay.settings import ServerSettings
from relay.upstream.base import Outgoing


class LimitsSource(Protocol):
    """Where an upstream gets the limits it shares (relay.fleet.Fleet)."""

    def limits(self, name: str, server: ServerSettings) -> SharedLimits:
        """The shared limits of servers.NAME."""


class SharedLimits(Protocol):
    def not_before(self) -> float:
        """When the next message may be tried, as far as the shared limits last said."""

    async def take(self, message: Outgoing) -> object:
        """Count `message` against rate_limit and max_recipients_per_day; raise
        RateLimited when it may not go now."""

    def give_back(self, taken: object) -> None:
        """The attempt counted by `take` failed as a whole (done in the background)."""

    async def connect(self) -> object:
        """A lease on one of the server's connections; raise RateLimited when every one
        is in use."""

    def disconnect(self, lease: object) -> None:
        """The connection of `lease` is closed (released in the background)."""

    def idle_for(self) -> float:
        """Seconds an idle connection may stay open: 0 while other relays wait for one."""
