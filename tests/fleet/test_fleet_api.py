"""An HTTP API server's limits in a fleet: two relays in this process, one redis-server,
the Graph stand-in of tests/api_servers.py (not Microsoft's service) and the test OAuth
server. The per-mailbox rate is the fleet's, whichever relay sends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.app import Relay
from tests.api_servers import GraphServer
from tests.fleet.redis_server import RedisServer
from tests.oauth_server import CLIENT_ID, USER, AuthServer
from tests.support import settings_for, wait_until
from tests.upstream.test_http_apis import api_sections, message, submit


@pytest.fixture
def authority() -> Iterator[AuthServer]:
    server = AuthServer().start()
    server.app_permissions[CLIENT_ID] = {"Mail.Send"}  # admin consent for Graph
    yield server
    server.close()


@pytest.fixture
def graph(authority: AuthServer) -> Iterator[GraphServer]:
    server = GraphServer(f"{authority.url}/introspect", {USER})
    yield server
    server.close()


@pytest.fixture
async def relays(tmp_path: Path, redis_server: RedisServer, graph: GraphServer,
                 authority: AuthServer) -> AsyncIterator[list[Relay]]:
    started: list[Relay] = []
    for node in ("a", "b"):
        sections = api_sections("graph", graph.url, authority, server={"rate_limit": "1/h"})
        relay = Relay(settings_for(tmp_path / node, fleet={"url": redis_server.url,
                                                           "node_name": node}, **sections))
        await relay.start()
        started.append(relay)
    yield started
    for relay in started:
        await relay.stop(grace=1)


async def test_an_api_servers_rate_limit_holds_for_the_whole_fleet(
        relays: list[Relay], graph: GraphServer) -> None:
    """rate_limit = "1/h" on the Graph server: one message an hour for the mailbox, not one
    per relay. The first relay's message goes; the second relay's waits in its queue."""
    first, second = relays
    sent = await submit(first, message(subject="from a"))
    await wait_until(lambda: first.spool.find(sent) is None)
    assert graph.answers == [202]
    held = await submit(second, message(subject="from b"))
    assert second.scheduler is not None
    upstream = second.scheduler.upstream
    await wait_until(lambda: upstream.not_before() > 0)  # tried, and told to wait
    await wait_until(lambda: (second.spool.find(held) or ("gone",))[0] != "active")
    assert graph.answers == [202]  # nothing more reached Graph
    found = second.spool.find(held)
    assert found is not None and found[0] == "queue"  # waiting for the fleet's limit
