"""A private redis-server for every fleet test (never a mock), and the upstream the
relays of a fleet send to."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fleet.redis_server import RedisServer
from tests.fleet.relays import Arrivals
from tests.upstream_servers import Servers


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Arrivals, int]]:
    """An SMTP server that notes each message's arrival, and its port."""
    servers = Servers()
    script = Arrivals()
    port = await servers.smtp(script)
    yield script, port
    await servers.close()
