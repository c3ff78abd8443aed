"""One account state for the fleet: Deactivate on one relay holds the mail of every relay,
Activate releases it everywhere (three installed `sysmail-relay serve`, one Redis)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.fleet.redis_server import RedisServer
from tests.fleet.relays import Arrivals, Fleet, submit, wait_for

RELAYS = 3


def set_active(config: Path, active: bool) -> None:
    text = config.read_text().replace("active = false\n", "")
    if not active:
        text = text.replace('server = "system"\n', 'server = "system"\nactive = false\n', 1)
    config.write_text(text)


async def test_deactivate_on_one_relay_holds_mail_on_all_and_activate_releases_it(
        tmp_path: Path, redis_server: RedisServer, upstream: tuple[Arrivals, int]) -> None:
    script, port = upstream
    fleet = Fleet(tmp_path, RELAYS, port, redis_server.url)
    await asyncio.to_thread(fleet.start)
    try:
        await wait_for(lambda: len(fleet.status(2)["fleet"]["members"]) == RELAYS, 20,
                       "the relays see each other")
        set_active(fleet.configs[0], False)
        fleet.daemons[0].send_signal(signal.SIGHUP)
        await wait_for(lambda: all(fleet.status(i)["account"]["system_email_account"]
                                   == "Inactive" for i in range(RELAYS)), 20,
                       "every relay's account is inactive")
        for i, daemon in enumerate(fleet.daemons):
            await asyncio.to_thread(submit, daemon.port, [f"r{i}-held@example.com"])
        await wait_for(lambda: all(fleet.status(i)["queue"]["held"] == 1
                                   for i in range(RELAYS)), 20, "each relay holds its message")
        assert script.arrived == []
        text = await asyncio.to_thread(fleet.status_text, 2)
        assert "account INACTIVE (mail is held on every relay), as set on relay0" in text

        set_active(fleet.configs[0], True)
        fleet.daemons[0].send_signal(signal.SIGHUP)
        await wait_for(lambda: len(script.arrived) == RELAYS, 30, "every held message sent")
    finally:
        await asyncio.to_thread(fleet.stop)
    assert sorted(r for _, r in script.arrived) == [f"r{i}-held@example.com"
                                                    for i in range(RELAYS)]
    assert "system account deactivated on relay0 (fleet): mail is held" in \
        fleet.daemons[1].log_text()
    assert "system account activated on relay0 (fleet): sending" in fleet.daemons[2].log_text()
