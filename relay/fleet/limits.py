"""One server's limits shared by the fleet (implements relay.upstream.shared.SharedLimits).

rate_limit and max_recipients_per_day are counted in Redis for every relay at once
(relay.fleet.scripts.TAKE, one atomic step; rate_limit also per sixth of its
interval, so that one relay's burst does not use up a whole interval before the
others ask), and so are the server's connections (`pool_size` for the whole fleet,
as leases that the heartbeat renews and that expire when a relay dies). While Redis
cannot be reached, each relay keeps to a conservative local share: the limit divided
by the number of relays it last saw (at least 1 message, 1 connection), and goes
back to the shared count once the heartbeat reaches Redis again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as redis

from relay.fleet.connect import UNREACHABLE
from relay.fleet.scripts import RENEW, TAKE
from relay.settings import ServerSettings
from relay.upstream.base import Outgoing
from relay.upstream.pacing import RateLimited

log = logging.getLogger("relay.fleet")

DAY = 86400
SPREAD = 6
"""rate_limit's interval is also counted in this many parts, each allowing that part of
the limit (rounded up): "30/min" sends at most 5 in any 10 s, and 30 in any minute."""
IDLE_SHARED = 2.0
"""Seconds an idle connection holds its lease before it is closed."""
CONNECTION_WAIT = 0.2
"""Seconds before asking again for a connection that every relay's pool uses."""
WAIT_IN_PLACE = 1.0
"""A delivery told to try again within this many seconds waits for it in place."""


class Member(Protocol):
    """What the limits need of the relay's membership (relay.fleet.node.Fleet)."""

    redis: redis.Redis
    prefix: str
    node: str
    connected: bool
    size: int
    lease_ttl: float

    def lost(self, error: BaseException) -> None: ...

    def background(self, work: Coroutine[Any, Any, None]) -> None: ...


Limit = tuple[str, int, float, int, float]
"""(what, limit, seconds an entry counts, weight, seconds to wait when refused to share)."""
_KINDS = {"rate": "window", "burst": "window", "day": "quota", "conn": "lease"}
"""How TAKE treats each: a sliding window, a quota (not shared fairly), a lease."""


@dataclass
class Taken:
    """What `take` or `connect` counted, to be given back: Redis members, or local ones."""

    members: list[tuple[str, str]] = field(default_factory=list)
    """(key, member) in Redis."""
    local: list[tuple[collections.deque[tuple[float, int, str]], str]] = field(
        default_factory=list)
    """(window, id) in the local share."""


class FleetLimits:
    """The shared limits of server `name`."""

    def __init__(self, fleet: Member, name: str, server: ServerSettings) -> None:
        self.fleet = fleet
        self.name = name
        self.server = server
        self._ready = 0.0
        self._script = fleet.redis.register_script(TAKE)
        self._renew = fleet.redis.register_script(RENEW)
        self.leases: set[str] = set()
        """This relay's connection leases in Redis (renewed with every heartbeat)."""
        self.waiting_for_connections = 0
        """Other relays that were refused a connection, as the last heartbeat saw."""
        self._local: dict[str, collections.deque[tuple[float, int, str]]] = {
            what: collections.deque() for what in ("rate", "burst", "day", "conn")}

    def key(self, what: str) -> str:
        return f"{self.fleet.prefix}{what}:{self.name}"

    def not_before(self) -> float:
        return self._ready

    # --- messages ----------------------------------------------------------------------

    def _message_limits(self, recipients: int) -> list[Limit]:
        """(what, limit, seconds an entry counts, weight, step when yielding)."""
        found = []
        if (rate := self.server.rate_limit) is not None:
            found.append(("rate", rate.count, float(rate.seconds), 1,
                          rate.seconds / rate.count))
            # and a sixth of it per sixth of the interval: one relay cannot take a whole
            # interval's messages at once before the others have asked
            found.append(("burst", math.ceil(rate.count / SPREAD), rate.seconds / SPREAD, 1,
                          rate.seconds / rate.count))
        if (quota := self.server.max_recipients_per_day) is not None:
            found.append(("day", quota, float(DAY), recipients, 1.0))
        return found

    async def take(self, message: Outgoing) -> object:
        limits = self._message_limits(len(message.recipients))
        if not limits:
            return Taken()
        return await self._take(limits, "rate_limit or max_recipients_per_day reached "
                                        "for the fleet")

    def give_back(self, taken: object) -> None:
        self._release(taken)

    # --- connections -------------------------------------------------------------------

    async def connect(self) -> object:
        limits = [("conn", self.server.pool_size, self.fleet.lease_ttl, 1, CONNECTION_WAIT)]
        taken = await self._take(limits, f"the fleet's {self.server.pool_size} connections "
                                         "(pool_size) are all in use", lease=True)
        assert isinstance(taken, Taken)
        self.leases.update(member for _, member in taken.members)
        return taken

    def disconnect(self, lease: object) -> None:
        assert isinstance(lease, Taken)
        self.leases.difference_update(member for _, member in lease.members)
        self._release(lease)

    def idle_for(self) -> float:
        """While other relays wait for a connection, none is kept idle: each goes back
        after its transaction and TAKE hands the lease to a waiting relay first. Else an
        idle one is kept for IDLE_SHARED seconds (a busy relay reuses it at once)."""
        return 0.0 if self.waiting_for_connections else IDLE_SHARED

    async def renew(self) -> None:
        """With each heartbeat: this relay's leases live on; who waits for a connection."""
        ttl = self.fleet.lease_ttl
        self.waiting_for_connections = int(await self._renew(
            keys=[self.key("conn"), self.key("conn") + ":waiting"],
            args=[ttl, self.fleet.node, *sorted(self.leases)]))

    # --- both ---------------------------------------------------------------------------

    async def _take(self, limits: list[Limit], why: str,
                    lease: bool = False) -> Taken:
        """Taken now, or after a short wait in place (at most WAIT_IN_PLACE at a time and
        the server's timeout in all): a delivery that will be let through within a moment
        keeps its place rather than going back to the queue. Else RateLimited."""
        waited = 0.0
        while True:
            try:
                if self.fleet.connected:
                    try:
                        return await self._take_shared(limits, why, lease)
                    except UNREACHABLE as e:
                        self.fleet.lost(e)
                return self._take_local(limits, why)
            except RateLimited as refused:
                pause = (refused.retry_at or 0.0) - time.time()
                if pause > WAIT_IN_PLACE or waited + pause > self.server.timeout:
                    raise
                pause = max(pause, 0.01)
                await asyncio.sleep(pause)
                waited += pause

    async def _take_shared(self, limits: list[Limit], why: str,
                           lease: bool) -> Taken:
        keys: list[str] = []
        args: list[str | int | float] = [self.fleet.node, uuid.uuid4().hex, len(limits)]
        for what, limit, seconds, weight, step in limits:
            keys += [self.key(what), self.key(what) + ":waiting"]
            args += [limit, seconds, weight, step, _KINDS[what]]
        answer = await self._script(keys=keys, args=args)
        if lease:
            self.waiting_for_connections = int(answer[3])
        if int(answer[0]) == 0:
            ready = time.time() + float(answer[2]) - float(answer[1])  # on this host's clock
            self._refused(ready, why)
        self._ready = 0.0
        return Taken(members=list(zip(keys[::2], answer[4:], strict=True)))

    def _take_local(self, limits: list[Limit], why: str) -> Taken:
        """The local share while Redis is unreachable: the limit / relays last seen."""
        now = time.time()
        members = max(1, self.fleet.size)
        ready = 0.0
        for what, limit, _, weight, step in limits:
            window = self._local[what]
            while window and window[0][0] <= now:
                window.popleft()
            share = max(1, limit // members)
            used = sum(w for _, w, _ in window)
            if used and used + weight > share:
                ready = max(ready, now + step if what == "conn" else window[0][0])
        if ready:
            self._refused(ready, f"{why} (local share while Redis is unreachable: 1/"
                                 f"{members} of the limit)")
        taken = Taken()
        for what, _, seconds, weight, _ in limits:
            entry = uuid.uuid4().hex
            self._local[what].append((now + seconds if what != "conn" else math.inf,
                                      weight, entry))
            taken.local.append((self._local[what], entry))
        return taken

    def _refused(self, ready: float, why: str) -> None:
        self._ready = ready
        clock = time.strftime("%H:%M:%SZ", time.gmtime(ready))
        raise RateLimited(f"{self.name}: {why}; next try at {clock}", ready)

    def _release(self, taken: object) -> None:
        assert isinstance(taken, Taken)
        for window, entry in taken.local:
            for item in list(window):
                if item[2] == entry:
                    window.remove(item)
        if taken.members and self.fleet.connected:
            self.fleet.background(self._release_shared(taken.members))

    async def _release_shared(self, members: list[tuple[str, str]]) -> None:
        try:
            async with self.fleet.redis.pipeline(transaction=False) as pipe:
                for key, member in members:
                    pipe.zrem(key, member)
                await pipe.execute()
        except UNREACHABLE as e:
            self.fleet.lost(e)  # the entries expire by themselves
