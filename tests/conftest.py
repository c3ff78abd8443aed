"""Fixtures shared by the tests: a relay in this process on a port the test picks."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import logs
from relay.app import Relay
from relay.delivery.scheduler import UpstreamFactory
from relay.settings import LogSettings
from tests.oauth_server import AuthServer
from tests.support import RelayFactory, settings_for

pytest_plugins = ["tests.peers.fixtures"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELAY_* variable from the caller's shell may change what a test configures."""
    for name in list(os.environ):
        if name.startswith("RELAY_") or name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name)
    # Every relay a test starts, in this process or as `serve`, gets its admin listener
    # on a free port rather than 8525 (tests and other test runs go on side by side).
    monkeypatch.setenv("RELAY_ADMIN__PORT", "0")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (the tests run as root in CI); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and must run as root (CI does)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def relay_factory(state_dir: Path) -> AsyncIterator[RelayFactory]:
    """Start relays in the test's event loop; all are stopped at the end."""
    logs.configure(LogSettings(level="debug"))
    started: list[Relay] = []

    async def start(upstreams: UpstreamFactory | None = None, **sections: Any) -> Relay:
        settings = settings_for(state_dir, **sections)
        relay = Relay(settings, upstreams=upstreams) if upstreams else Relay(settings)
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.stop(grace=1)


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> Relay:
    return await relay_factory()


BOTH_LOOPS = frozenset({"test_listener.py", "test_smtp_pool.py", "test_delivery.py",
                        "test_pop3.py"})
"""The data path's modules also run on uvloop (`event_loop = "uvloop"`). Everything else
runs on asyncio's own loop, as `serve` does by default."""


def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """TEST_EVENT_LOOP=asyncio or =uvloop runs every test on that loop alone."""
    import uvloop
    loops: dict[str, Callable[[], Any]] = {
        "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    chosen = os.environ.get("TEST_EVENT_LOOP")
    if chosen in loops:
        return {chosen: loops[chosen]}
    return loops if item.path.name in BOTH_LOOPS else {"asyncio": loops["asyncio"]}


@pytest.fixture(scope="module")
def authority() -> Iterator[AuthServer]:
    """The test OAuth server (tests/oauth_server.py), one per test module."""
    server = AuthServer().start()
    yield server
    server.close()


@pytest.fixture
def provider(authority: AuthServer) -> AuthServer:
    """`authority` back to its defaults for each test (a module may define its own)."""
    authority.reset()
    return authority
