"""The admin listener of a relay in a fleet: the page and /metrics show the fleet, and
say so when Redis does not answer (the relay runs in this process, Redis is real)."""

from __future__ import annotations

import asyncio
import urllib.request

from relay.app import Relay
from tests.fleet.redis_server import RedisServer
from tests.fleet.relays import submit
from tests.support import RelayFactory, listener_port, outbox_files, wait_until


def get(relay: Relay, path: str) -> str:
    assert relay.admin is not None and relay.admin.address is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin.address[1]}{path}",
                                timeout=10) as response:
        text: str = response.read().decode()
        return text


async def fleet_relay(relay_factory: RelayFactory, url: str) -> Relay:
    return await relay_factory(fleet={"url": url, "node_name": "pod-a", "heartbeat": 1,
                                      "timeout": 0.5})


async def test_the_page_and_metrics_show_the_fleet(relay_factory: RelayFactory,
                                                   redis_server: RedisServer) -> None:
    relay = await fleet_relay(relay_factory, redis_server.url)
    page = await asyncio.to_thread(get, relay, "/")
    metrics = await asyncio.to_thread(get, relay, "/metrics")
    assert '<h2 id="fleet-title">Fleet</h2>' in page
    assert "<code>pod-a</code>" in page and "connected" in page
    assert "relay_fleet_connected 1.0" in metrics
    assert "relay_fleet_members 1.0" in metrics


async def test_without_redis_the_relay_starts_accepts_and_says_so(
        relay_factory: RelayFactory, redis_server: RedisServer) -> None:
    redis_server.stop()
    relay = await fleet_relay(relay_factory, redis_server.url)
    page = await asyncio.to_thread(get, relay, "/")
    metrics = await asyncio.to_thread(get, relay, "/metrics")
    status = relay.fleet_status()
    assert "not reachable" in page and "local share of the limits (1/1)" in page
    assert "relay_fleet_connected 0.0" in metrics
    assert status is not None and status["connected"] is False
    assert f"connecting to 127.0.0.1:{redis_server.port}" in (status["last_error"] or "")
    # acceptance never asks Redis: smtplib raises unless the message got its 250
    await asyncio.to_thread(submit, listener_port(relay), ["user@example.com"])
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
