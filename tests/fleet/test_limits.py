"""The limits a fleet shares (relay.fleet.limits) against a real redis-server: the rate and
the daily quota hold for all relays together, connections are leases that a dead
relay's expire, nobody is starved, and a relay without Redis keeps to its share."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.fleet import Fleet, FleetLimits
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.spool.envelope import Envelope, Recipient
from relay.upstream.base import Outgoing
from relay.upstream.pacing import RateLimited
from tests.fleet.redis_server import RedisServer
from tests.support import settings_for

SERVER = "system"
FleetMaker = Callable[..., Awaitable[Fleet]]


def message(recipients: int = 1) -> Outgoing:
    rcpts = [Recipient(f"user{i}@example.com") for i in range(recipients)]
    env = Envelope(id="0", sender="app@example.com", recipients=rcpts)
    return Outgoing(env, Path("/nonexistent"), "notify@example.com", rcpts)


@pytest.fixture
async def fleets(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[FleetMaker]:
    made: list[Fleet] = []

    async def make(node: str, url: str | None = None, heartbeat: float = 5,
             **server: Any) -> Fleet:
        settings = settings_for(
            tmp_path / node, system_account={"address": "notify@example.com",
                                             "server": SERVER},
            servers={SERVER: {"host": "127.0.0.1", "port": 25, "timeout": 1, **server}},
            fleet={"url": url or redis_server.url, "node_name": node, "heartbeat": heartbeat,
                   "timeout": 0.5})
        fleet = Fleet(settings, Metrics(), lambda: {"queued": 0})
        made.append(fleet)
        await fleet.beat()  # as start() does, without the heartbeat task
        return fleet

    yield make
    for fleet in made:
        await fleet.stop()


def limits_of(fleet: Fleet) -> FleetLimits:
    server = fleet.settings.servers[SERVER]
    assert isinstance(server, ServerSettings)
    return fleet.limits(SERVER, server)


async def test_the_rate_limit_holds_for_all_relays_together(fleets: FleetMaker) -> None:
    """30/min: at most 5 in any 10 s (a sixth), whichever relay sends them."""
    a, b = [limits_of(await fleets(n, rate_limit="30/min")) for n in ("a", "b")]
    for limits in (a, b, a, b, a):
        await limits.take(message())
    for limits in (a, b):
        with pytest.raises(RateLimited) as refused:
            await limits.take(message())
        assert "for the fleet" in refused.value.reply
        assert refused.value.retry_at is not None and refused.value.retry_at > 0
        assert limits.not_before() == refused.value.retry_at


async def test_one_relay_cannot_take_a_whole_interval_at_once(fleets: FleetMaker) -> None:
    """Before the others have even asked: 30/min lets 5 go in 10 s, not 30 at once."""
    (a,) = [limits_of(await fleets("a", rate_limit="30/min"))]
    for _ in range(5):
        await a.take(message())
    with pytest.raises(RateLimited) as refused:
        await a.take(message())
    now = time.time()
    assert refused.value.retry_at is not None and now < refused.value.retry_at <= now + 10


async def test_an_attempt_given_back_uses_up_no_limit(fleets: FleetMaker) -> None:
    a, b = [limits_of(await fleets(n, rate_limit="12/min")) for n in ("a", "b")]
    await a.take(message())
    taken = await a.take(message())
    a.give_back(taken)
    await fleets_settle(a)
    await b.take(message())


async def fleets_settle(limits: FleetLimits) -> None:
    """Wait for the background work of `give_back` and `disconnect`."""
    fleet = limits.fleet
    assert isinstance(fleet, Fleet)
    while fleet._tasks:
        await next(iter(fleet._tasks))


async def test_the_daily_recipient_quota_counts_every_relays_recipients(
        fleets: FleetMaker) -> None:
    a, b = [limits_of(await fleets(n, max_recipients_per_day=10)) for n in ("a", "b")]
    await a.take(message(6))
    await b.take(message(3))
    with pytest.raises(RateLimited):
        await b.take(message(2))
    await a.take(message(1))


async def test_a_busy_relay_does_not_starve_a_waiting_one(fleets: FleetMaker) -> None:
    busy, other = [limits_of(await fleets(n, rate_limit="24/min"))
                   for n in ("busy", "other")]
    taken = [await busy.take(message()) for _ in range(4)]
    with pytest.raises(RateLimited):
        await other.take(message())  # full: "other" now waits
    busy.give_back(taken.pop())
    busy.give_back(taken.pop())
    await fleets_settle(busy)
    with pytest.raises(RateLimited):  # room for 2, but "busy" has its share (4 / 2 per 10 s)
        await busy.take(message())
    await other.take(message())


async def test_connections_are_limited_for_the_fleet_and_handed_to_a_waiting_relay(
        fleets: FleetMaker) -> None:
    a, b = [limits_of(await fleets(n, pool_size=2)) for n in ("a", "b")]
    first = await a.connect()
    await a.connect()
    with pytest.raises(RateLimited) as refused:
        await b.connect()
    assert "connections (pool_size) are all in use" in refused.value.reply
    assert a.idle_for() > 0  # nobody waited when a last asked
    await a.renew()  # the heartbeat: b waits for a connection
    assert a.idle_for() == 0
    a.disconnect(first)
    await fleets_settle(a)
    with pytest.raises(RateLimited):  # the free one is b's: b waited, a did not
        await a.connect()
    await b.connect()


async def test_a_dead_relays_connections_expire(fleets: FleetMaker) -> None:
    dead = limits_of(await fleets("dead", pool_size=1, heartbeat=1))
    alive = limits_of(await fleets("alive", pool_size=1, heartbeat=1))
    await dead.connect()  # and never renews it
    with pytest.raises(RateLimited):
        await alive.connect()
    while True:  # the lease lives 3 heartbeats and the timeout, then is free
        try:
            await alive.connect()
            break
        except RateLimited as e:
            assert e.retry_at is not None
            await _sleep_until(e.retry_at)


async def _sleep_until(when: float) -> None:
    import asyncio
    import time
    await asyncio.sleep(max(0.05, when - time.time()))


async def test_without_redis_a_relay_keeps_to_its_share_of_the_limit(
        fleets: FleetMaker, redis_server: RedisServer, tmp_path: Path) -> None:
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "fleet-size").write_text("3\n")  # the fleet it saw last
    fleet = await fleets("alone", url="redis://127.0.0.1:1/0", rate_limit="36/min")
    assert not fleet.connected and fleet.size == 3
    limits = limits_of(fleet)
    await limits.take(message())
    await limits.take(message())
    with pytest.raises(RateLimited) as refused:
        await limits.take(message())
    assert "local share while Redis is unreachable: 1/3" in refused.value.reply
