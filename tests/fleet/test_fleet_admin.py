"""The admin listener of a relay in a fleet: the page and /metrics show the fleet, and
say so when Redis does not answer (the relay runs in this process, Redis is real)."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import aiohttp

from relay.app import Relay
from relay.settings import load_settings
from tests.admin.test_admin import Admin, form_from
from tests.fleet.redis_server import RedisServer
from tests.fleet.relays import submit
from tests.support import RelayFactory, listener_port, outbox_files, wait_until
from tests.test_metrics_series import (
    FLEET_ONLY,
    alert_test_series,
    any_client,
    exported_series,
)


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
    # what the alert rules' unit tests feed in is what a relay in a fleet exports
    fed = {s for s in alert_test_series() if s[0].startswith(FLEET_ONLY)}
    assert fed
    assert fed <= any_client(exported_series(metrics))


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


async def test_deactivate_on_one_relays_page_and_activate_on_anothers_hold_and_release_all(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Deactivate on pod-b's page holds pod-a too; Activate on pod-a's page (whose own
    configuration still says active = true) releases pod-b."""
    relays = []
    for name in ("pod-a", "pod-b"):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"""
state_dir = "{tmp_path / name}"
[listener]
port = 0
workers = 1
[system_account]
address = "notify@example.com"
[admin]
port = 0
allow_changes = true
[fleet]
url = "{redis_server.url}"
node_name = "{name}"
heartbeat = 1
timeout = 0.5
""")
        relay = Relay(load_settings(config), config)
        await relay.start()
        relays.append(relay)
    a, b = relays
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for here, there, active in ((b, a, False), (a, b, True)):
                page = Admin(here, http)
                form = form_from((await page.get("/change"))[1])
                assert form["active"] == ("false" if active else "true")
                form["active"] = "true" if active else "false"
                status, _, _ = await page.post("/change", form)
                assert status == 303
                assert here.settings.system_account.active is active
                await wait_until(lambda r=there, want=active:
                                 r.settings.system_account.active is want, within=10)
                assert there.scheduler is not None and there.scheduler.held is not active
    finally:
        for relay in relays:
            await relay.stop(grace=1)
