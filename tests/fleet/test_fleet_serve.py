"""Three installed `sysmail-relay serve` processes, one redis-server, one upstream that
records arrival times: the fleet's rate limit holds at the upstream with nobody
starved, `status` shows the fleet, and Redis stopped and started in the middle of a
run loses nothing and sends nothing twice."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

from tests.fleet.redis_server import RedisServer
from tests.fleet.relays import Arrivals, Fleet, submit_to_all, wait_for

RELAYS = 3


def most_within(times: list[float], span: float) -> int:
    """The most arrivals in any interval [t, t + span)."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - span:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_the_rate_limit_holds_for_the_fleet_at_the_upstream_and_nobody_starves(
        tmp_path: Path, redis_server: RedisServer, upstream: tuple[Arrivals, int]) -> None:
    script, port = upstream
    fleet = Fleet(tmp_path, RELAYS, port, redis_server.url, server='rate_limit = "10/s"')
    await asyncio.to_thread(fleet.start)
    try:
        per_relay = 20
        sent = await submit_to_all(fleet, per_relay)
        await wait_for(lambda: len(script.arrived) >= len(sent), 60, "every message arrived")
    finally:
        await asyncio.to_thread(fleet.stop)
    got = [rcpt for _, rcpt in script.arrived]
    assert sorted(got) == sorted(sent)  # each once
    times = [t for t, _ in script.arrived]
    # A message is counted in Redis just before it is sent and arrives a moment later:
    # arrivals within 2 s were counted within 2 s plus that moment (under 1 s), so at
    # most 3 windows' worth. Three relays each pacing itself to 10/s send 30/s: 60.
    assert most_within(times, 2.0) <= 30
    # Nobody starved: in the first half of the arrivals every relay has a good part of
    # its messages (a third each would be fair; measured: 11, 10 and 9 of 30).
    first_half = [rcpt for _, rcpt in sorted(script.arrived)[:len(sent) // 2]]
    by_relay = collections.Counter(rcpt.split("-")[0] for rcpt in first_half)
    assert all(by_relay[f"r{i}"] >= per_relay // 5 for i in range(RELAYS)), by_relay


async def test_status_shows_every_live_relay_of_the_fleet(
        tmp_path: Path, redis_server: RedisServer, upstream: tuple[Arrivals, int]) -> None:
    _, port = upstream
    fleet = Fleet(tmp_path, RELAYS, port, redis_server.url)
    await asyncio.to_thread(fleet.start)
    try:
        await wait_for(lambda: len(fleet.status(0)["fleet"]["members"]) == RELAYS, 20,
                       "relay0 sees the three relays")
        status = await asyncio.to_thread(fleet.status, 0)
        text = await asyncio.to_thread(fleet.status_text, 0)
    finally:
        await asyncio.to_thread(fleet.stop)
    assert status["fleet"]["connected"] is True
    assert [m["node"] for m in status["fleet"]["members"]] == ["relay0", "relay1", "relay2"]
    assert all("queued" in m["queue"] for m in status["fleet"]["members"])
    assert f"Redis {redis_server.url}: connected; this relay is relay0; 3 relays alive" in text
    assert "  relay0 (this relay): queued 0" in text
    assert "  relay2: queued 0" in text


async def test_redis_stopped_and_started_mid_run_loses_and_duplicates_nothing(
        tmp_path: Path, redis_server: RedisServer, upstream: tuple[Arrivals, int]) -> None:
    script, port = upstream
    fleet = Fleet(tmp_path, RELAYS, port, redis_server.url, server='rate_limit = "30/s"')
    await asyncio.to_thread(fleet.start)
    try:
        per_relay = 40
        sending = asyncio.create_task(submit_to_all(fleet, per_relay))
        await wait_for(lambda: len(script.arrived) >= 15, 60, "15 arrivals")
        await asyncio.to_thread(redis_server.stop)
        before = len(script.arrived)
        await wait_for(lambda: len(script.arrived) >= before + 15, 60,
                       "delivery goes on without Redis")
        statuses = [await asyncio.to_thread(fleet.status, i) for i in range(RELAYS)]
        await asyncio.to_thread(redis_server.start)
        sent = await sending
        await wait_for(lambda: len(script.arrived) >= len(sent), 60, "every message arrived")
        await wait_for(lambda: all(fleet.status(i)["fleet"]["connected"]
                                   for i in range(RELAYS)), 20, "every relay rejoined")
        text = await asyncio.to_thread(fleet.status_text, 1)
    finally:
        await asyncio.to_thread(fleet.stop)
    got = [rcpt for _, rcpt in script.arrived]
    assert sorted(got) == sorted(sent)  # nothing lost, nothing twice
    assert all(s["fleet"]["connected"] is False for s in statuses)
    assert "3 relays alive" in text
    for daemon in fleet.daemons:
        log = daemon.log_text()
        assert log.count("does not answer") == 1, log  # said once, not per message
        assert log.count("fleet: connected to Redis") == 2, log
