"""One token for three installed `sysmail-relay serve` processes (issue 22): a sign-in
with `sysmail-relay oauth authorize` on one relay lets all three send; when the access
token expires, one refresh serves all three (the provider counts them); a refresh token
revoked at the provider turns all three to "Not granted" and they hold their mail;
a sign-in on another relay releases it everywhere. The provider is the test OAuth
server; the upstream accepts XOAUTH2 with a token the provider says is active."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.fleet.redis_server import RedisServer
from tests.fleet.relays import Fleet, submit, wait_for
from tests.oauth.test_oauth import client_config, line_with, run_authorize
from tests.oauth_server import USER, AuthServer
from tests.test_no_secrets import OAuthScript
from tests.upstream_servers import Servers

RELAYS = 3
FRESH = 20
"""Seconds the first access token is fresh for: the relays' first messages go within
them, then all three need a new one at the same moment."""


@pytest.fixture
def provider() -> AsyncIterator[AuthServer]:
    server = AuthServer().start()
    yield server  # type: ignore[misc]
    server.close()


def sign_in(config: Path, provider: AuthServer) -> None:
    """`sysmail-relay oauth authorize --no-browser`, the test playing the browser."""
    proc = run_authorize(config, "--no-browser")
    url = line_with(proc, provider.url).strip()
    httpx.get(url, follow_redirects=True, timeout=10)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err


async def test_one_sign_in_for_the_fleet_a_revocation_holds_all_another_sign_in_releases_all(
        tmp_path: Path, redis_server: RedisServer, provider: AuthServer) -> None:
    servers = Servers()
    upstream = OAuthScript(provider)
    upstream.accept = True
    port = await servers.smtp(upstream, auth_require_tls=False)
    key = tmp_path / "token_key"
    key.write_text("5a" * 32 + "\n")
    key.chmod(0o600)
    client = "".join(f"{k} = {json.dumps(v)}\n" for k, v in client_config(provider).items())
    fleet = Fleet(tmp_path, RELAYS, port, redis_server.url,
                  server='[servers.system.oauth]\nclient = "test"\n',
                  extra=f'token_key_file = "{key}"\n[oauth_clients.test]\n{client}')
    for config in fleet.configs:  # the account is the mailbox the provider signs in
        config.write_text(config.read_text().replace("notify@example.com", USER))
    await asyncio.to_thread(fleet.start)
    try:
        def delivered() -> int:
            return len(upstream.messages)

        # an access token fresh for FRESH seconds (the relay renews a short-lived one when
        # half its lifetime is left)
        provider.access_ttl = 2 * FRESH
        await asyncio.to_thread(sign_in, fleet.configs[0], provider)
        signed_in = time.monotonic()  # the token was issued a moment before
        for i, daemon in enumerate(fleet.daemons):
            await asyncio.to_thread(submit, daemon.port, [f"r{i}-first@example.com"])
        await wait_for(lambda: delivered() == RELAYS, 30, "every relay sends, one sign-in")
        assert provider.count("refresh_token ok") == 0
        assert time.monotonic() - signed_in < FRESH - 5, "too slow to see one expiry"

        # the token expires: each relay needs a new one for its next login, at once
        await asyncio.sleep(FRESH + 1 - (time.monotonic() - signed_in))
        upstream.hang_up_all()
        for i, daemon in enumerate(fleet.daemons):
            await asyncio.to_thread(submit, daemon.port, [f"r{i}-renewed@example.com"])
        await wait_for(lambda: delivered() == 2 * RELAYS, 30, "every relay sends, renewed")
        assert provider.count("refresh_token ok") == 1  # one refresh for the whole fleet

        provider.revoke_user()  # the access tokens too: the next login is refused
        upstream.hang_up_all()  # (a session logged in before stays logged in)
        for i, daemon in enumerate(fleet.daemons):
            await asyncio.to_thread(submit, daemon.port, [f"r{i}-held@example.com"])
        await wait_for(lambda: all(fleet.status(i)["queue"]["held"] == 1
                                   for i in range(RELAYS)), 40, "every relay holds its mail")
        assert all(fleet.status(i)["account"]["oauth_authorization"] == "Not granted"
                   for i in range(RELAYS))
        assert provider.count("refresh_token invalid_grant") == 1  # found once, for all

        await asyncio.to_thread(sign_in, fleet.configs[2], provider)  # on another relay
        await wait_for(lambda: delivered() == 3 * RELAYS, 40, "every relay sends again")
    finally:
        await asyncio.to_thread(fleet.stop)
        await servers.close()
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == sorted(
        [f"r{i}-{phase}@example.com" for i in range(RELAYS)
         for phase in ("first", "renewed", "held")])
