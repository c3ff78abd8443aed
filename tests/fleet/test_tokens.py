"""One token for the fleet (relay.fleet.tokens) against a real redis-server and the test
OAuth server (tests/oauth_server.py): two relays' OAuth managers, each with its own state
directory, share one encrypted token; one refreshes per expiry; a sign-in on one grants
both; a refusal on one holds both."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.admin import status
from relay.errors import NotGranted, TokenStoreError
from relay.fleet import Fleet
from relay.metrics import Metrics
from relay.oauth.manager import OAuth
from tests.fleet.redis_server import RedisServer
from tests.oauth.test_oauth import client_config, due, sign_in
from tests.oauth_server import USER, AuthServer
from tests.support import settings_for

Relay = tuple[OAuth, Fleet]
RelayMaker = Callable[..., Awaitable[Relay]]


def key_file(path: Path, hexdigits: str) -> Path:
    path.write_text(hexdigits + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def relays(tmp_path: Path, redis_server: RedisServer,
                 provider: AuthServer) -> AsyncIterator[RelayMaker]:
    made: list[Fleet] = []
    shared_key = key_file(tmp_path / "token_key", "ab" * 32)

    async def make(name: str, key: Path = shared_key) -> Relay:
        settings = settings_for(
            tmp_path / name, system_account={"address": USER, "server": "up"},
            servers={"up": {"host": "127.0.0.1", "port": 2, "encryption": "none",
                            "timeout": 2, "oauth": {"client": "test"}}},
            oauth_clients={"test": client_config(provider)},
            fleet={"url": redis_server.url, "node_name": name, "token_key_file": str(key),
                   "heartbeat": 1, "timeout": 0.5})
        oauth = OAuth(settings, Metrics())
        fleet = Fleet(settings, Metrics(), dict)
        fleet.share_tokens(oauth)
        await fleet.beat()
        made.append(fleet)
        return oauth, fleet

    yield make
    for fleet in made:
        await fleet.stop()


async def test_a_sign_in_on_one_relay_grants_every_relay(relays: RelayMaker) -> None:
    (a, _), (b, _) = await relays("a"), await relays("b")
    assert not b.authorization("test").granted
    await sign_in(a)
    assert b.authorization("test").granted
    assert await b.access_token("test") == await a.access_token("test")
    # what `status` reads (the relay's own token file) says so too
    assert "Granted" in status.render(status.collect(b.settings))


async def test_one_refresh_per_expiry_for_the_whole_fleet_with_the_rotated_token(
        relays: RelayMaker, provider: AuthServer) -> None:
    (a, _), (b, _) = await relays("a"), await relays("b")
    await sign_in(a)
    old = due(a)
    tokens = await asyncio.gather(*(oauth.access_token("test")
                                    for oauth in (a, b, a, b, a, b)))
    assert len(set(tokens)) == 1 and tokens[0] != old.access_token
    assert provider.count("refresh_token ok") == 1
    due(b)  # the next expiry, refreshed by the other relay with the rotated refresh token
    assert len({await b.access_token("test"), await a.access_token("test")}) == 1
    assert provider.count("refresh_token ok") == 2
    assert provider.count("refresh_token invalid_grant") == 0


async def test_a_refused_refresh_token_on_one_relay_holds_every_relay_until_a_sign_in(
        relays: RelayMaker, provider: AuthServer) -> None:
    (a, fleet_a), (b, _) = await relays("a"), await relays("b")
    await sign_in(a)
    due(a)
    provider.revoke_user()
    await fleet_a.beat()  # granted, as far as relay a has seen
    with pytest.raises(NotGranted):
        await a.access_token("test")
    with pytest.raises(NotGranted):  # b holds too, without asking the provider again
        await b.access_token("test")
    assert provider.count("refresh_token invalid_grant") == 1
    assert not b.authorization("test").granted
    released: list[str] = []
    fleet_a.on_token_granted = released.append
    await fleet_a.beat()
    await sign_in(b)  # on the other relay
    await fleet_a.beat()
    assert released == ["test"]  # relay a's held mail is due now
    assert a.authorization("test").granted and await a.access_token("test")


async def test_a_dump_of_redis_holds_no_usable_token(relays: RelayMaker,
                                                     redis_server: RedisServer) -> None:
    (a, fleet), _ = await relays("a"), None
    await sign_in(a)
    token = a.store.load("test", USER)
    assert fleet.tokens is not None and token is not None
    raw = await fleet.redis.get(fleet.tokens.key("test", USER))
    assert isinstance(raw, str)
    dump = raw.encode() + base64.b64decode(raw)
    for secret in (token.access_token, token.refresh_token):
        assert secret and secret.encode() not in dump


async def test_a_relay_with_another_token_key_says_what_to_fix(
        relays: RelayMaker, tmp_path: Path) -> None:
    (a, _) = await relays("a")
    await sign_in(a)
    (c, _) = await relays("c", key_file(tmp_path / "other_key", "cd" * 32))
    with pytest.raises(TokenStoreError, match="same \\[fleet\\] token_key_file"):
        c.store.load("test", USER)


async def test_status_names_the_relay_that_holds_the_refresh_lock(relays: RelayMaker) -> None:
    (a, _), (_, fleet_b) = await relays("a"), await relays("b")
    await sign_in(a)
    async with a.refresh_guard("test", USER):
        await fleet_b.beat()
        assert fleet_b.status()["refresh_lock"] == {"test": "a"}
        assert "  OAuth client test: a is refreshing the token" in \
            status_lines(fleet_b.status())
    await fleet_b.beat()
    assert fleet_b.status()["refresh_lock"] == {}


def status_lines(fleet: dict[str, object]) -> list[str]:
    from relay.admin.fleet_view import fleet_lines
    return fleet_lines(fleet)


async def test_without_redis_each_relay_uses_its_copy_and_shares_what_it_stored_later(
        relays: RelayMaker, redis_server: RedisServer) -> None:
    (a, fleet_a), (b, fleet_b) = await relays("a"), await relays("b")
    await sign_in(a)
    first = await b.access_token("test")  # b's own copy now holds it too
    redis_server.stop()
    await fleet_a.beat()
    await fleet_b.beat()
    assert not fleet_a.connected and not fleet_b.connected
    assert await b.access_token("test") == first  # from b's own file, Redis not asked
    await sign_in(a)  # a new grant while Redis is away: stored on a only
    signed_again = a.store.load("test", USER)
    redis_server.start()
    await fleet_a.beat()  # connected: a's newer copy goes to Redis
    await fleet_b.beat()
    assert signed_again is not None
    assert await b.access_token("test") == signed_again.access_token
