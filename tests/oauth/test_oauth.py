"""OAuth 2.0 against a real authorization server on 127.0.0.1 (tests/oauth_server.py).

The `oauth authorize` command is driven end to end (the test plays the browser: it
opens the printed address, the server redirects to the command's loopback listener);
the rest runs the `OAuth` manager in the test's loop: sign-in checks (state, replayed
code, consent denied), the token store's rules, refresh (single-flight, rotation,
invalid_grant, provider down, idle keep-alive), client credentials, the providers'
parameters, XOAUTH2's refresh-and-retry-once, and that no token ever leaks.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from relay.admin import status
from relay.errors import (
    AuthenticationFailure,
    Held,
    NotGranted,
    OAuthError,
    ProviderRefused,
    ProviderUnreachable,
    TokenStoreError,
)
from relay.metrics import Metrics
from relay.oauth import terminal as oauth_flow
from relay.oauth.manager import IDLE_REFRESH, OAuth
from relay.oauth.providers import DESCRIPTION_MAX, ProviderClient
from relay.oauth.store import StoredToken, TokenStore
from relay.settings import OAuthClientSettings, Settings
from relay.upstream.probe import probe
from relay.upstream.smtp import Session
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer, redirect_query
from tests.support import relay_command, settings_for

REDIRECT = "http://127.0.0.1:9/"  # the provider's answer is read from its Location header


def client_config(server: AuthServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "generic", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "authorize_url": f"{server.url}/authorize", "token_url": f"{server.url}/token",
            "device_url": f"{server.url}/device", "revocation_url": f"{server.url}/revoke",
            "scopes": ["smtp", "offline_access"], **extra}


def make_settings(tmp_path: Path, server: AuthServer, port: int = 2, **client: Any) -> Settings:
    return settings_for(
        tmp_path / "state", system_account={"address": USER, "server": "up"},
        servers={"up": {"host": "127.0.0.1", "port": port, "encryption": "none", "timeout": 2,
                        "oauth": {"client": "test"}}},
        oauth_clients={"test": client_config(server, **client)})


def toml(tmp_path: Path, server: AuthServer) -> Path:
    path = tmp_path / "relay.toml"
    cfg = client_config(server)
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[system_account]\naddress = "{USER}"\nserver = "up"\n'
        '[servers.up]\nhost = "127.0.0.1"\nport = 2\n[servers.up.oauth]\nclient = "test"\n'
        "[oauth_clients.test]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def answer_of(url: str) -> dict[str, str]:
    return redirect_query(url)


async def sign_in(oauth: OAuth, client: str = "test") -> None:
    answer = answer_of(oauth.start_authorization(client, REDIRECT))
    auth = await oauth.finish_authorization(answer["state"], answer.get("code"), None)
    assert auth.granted


def age(oauth: OAuth, **changes: Any) -> StoredToken:
    """Rewrite the stored token (e.g. make it due for refresh)."""
    token = oauth.store.load("test", USER)
    assert token is not None
    token = dataclasses.replace(token, **changes)
    oauth.store.save(token)
    return token


def due(oauth: OAuth) -> StoredToken:
    """The access token expires in a minute: inside the refresh margin."""
    return age(oauth, expires_at=time.time() + 60, obtained_at=time.time() - 3540)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
async def oauth(tmp_path: Path, provider: AuthServer) -> AsyncIterator[OAuth]:
    yield OAuth(make_settings(tmp_path, provider), Metrics())


# --- signing in from the command line ----------------------------------------------------


def run_authorize(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([relay_command(), "oauth", "authorize", *args, "--config",
                             str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def line_with(proc: subprocess.Popen[str], text: str) -> str:
    assert proc.stdout is not None
    seen = []
    while line := proc.stdout.readline():
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r}: {''.join(seen)}{proc.stderr.read()}")  # type: ignore[union-attr]


def test_authorize_command_signs_in_with_pkce_through_the_loopback_redirect(
        tmp_path: Path, provider: AuthServer) -> None:
    config = toml(tmp_path, provider)
    proc = run_authorize(config, "--no-browser")
    url = line_with(proc, provider.url).strip()
    page = httpx.get(url, follow_redirects=True, timeout=10)  # the browser
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert page.status_code == 200 and "Signed in" in page.text, page.text
    assert "test: OAuth authorization Granted (generic, notify@example.com)" in out
    (request,) = provider.authorize_requests
    assert request["code_challenge_method"] == "S256" and len(request["code_challenge"]) == 43
    assert len(request["state"]) >= 32 and request["login_hint"] == USER
    redirect = urlsplit(request["redirect_uri"])
    assert (redirect.scheme, redirect.hostname) == ("http", "127.0.0.1") and redirect.port
    tokens = tmp_path / "state" / "tokens"
    (stored,) = tokens.iterdir()
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o700
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert provider.refresh_token_active(json.loads(stored.read_text())["refresh_token"])
    shown = subprocess.run([relay_command(), "oauth", "status", "--config", str(config)],
                           capture_output=True, text=True, timeout=30)
    assert "test: OAuth authorization Granted (generic, notify@example.com); access token " \
           "valid until" in shown.stdout
    for secret in provider.issued():
        assert secret not in out + err + page.text + shown.stdout


def test_authorize_device_flow_needs_only_a_code_entered_elsewhere(
        tmp_path: Path, provider: AuthServer) -> None:
    proc = run_authorize(toml(tmp_path, provider), "--device")
    line = line_with(proc, "enter the code")
    assert f"{provider.url}/device/verify" in line
    user_code = line.rsplit(" ", 1)[1].strip()
    approved = httpx.get(f"{provider.url}/device/verify", params={"user_code": user_code})
    assert approved.status_code == 200
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "OAuth authorization Granted" in out
    assert provider.count(f"{'urn:ietf:params:oauth:grant-type:device_code'} ok") == 1


def test_google_refuses_the_device_flow_and_says_what_works(tmp_path: Path,
                                                            provider: AuthServer) -> None:
    settings = make_settings(tmp_path, provider, provider="google", device_url=None,
                             scopes=None)
    with pytest.raises(OAuthError, match=r"Google does not allow the Gmail scope .* without "
                                         r"--device"):
        oauth_flow.authorize(settings, "test", device=True, browser=False, emit=print)
    assert provider.events == []


# --- the answer from the provider ---------------------------------------------------------


async def test_answer_with_a_wrong_state_is_refused_and_nothing_is_stored(
        oauth: OAuth, provider: AuthServer) -> None:
    answer = answer_of(oauth.start_authorization("test", REDIRECT))
    with pytest.raises(OAuthError, match="does not belong to a sign-in started here"):
        await oauth.finish_authorization("forged-state", answer["code"], None)
    assert oauth.store.all() == [] and provider.events == []
    assert not oauth.authorization("test").granted


async def test_replayed_answer_and_replayed_code_are_refused(oauth: OAuth,
                                                             provider: AuthServer) -> None:
    answer = answer_of(oauth.start_authorization("test", REDIRECT))
    await oauth.finish_authorization(answer["state"], answer["code"], None)
    stored = oauth.store.load("test", USER)
    with pytest.raises(OAuthError, match="already used state"):
        await oauth.finish_authorization(answer["state"], answer["code"], None)
    # the same code with another sign-in's state: the provider refuses it
    other = answer_of(oauth.start_authorization("test", REDIRECT))
    with pytest.raises(OAuthError, match=r"code was already used or has expired.*nothing was "
                                         r"stored"):
        await oauth.finish_authorization(other["state"], answer["code"], None)
    assert oauth.store.load("test", USER) == stored
    assert provider.count("authorization_code invalid_grant") == 1


async def test_consent_denied_shows_a_clear_message_and_stores_nothing(
        oauth: OAuth, provider: AuthServer) -> None:
    provider.deny_consent = True
    shown: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(oauth_flow._sign_in(oauth, "test", False, shown.put_nowait))
    url = (await asyncio.wait_for(shown.get(), 10)).split()[-1]
    page = await asyncio.to_thread(httpx.get, url, follow_redirects=True, timeout=10)
    with pytest.raises(OAuthError, match=r"refused or cancelled \(access_denied: The user denied "
                                         r"access\); nothing was stored"):
        await task
    assert page.status_code == 400 and "nothing was stored" in page.text
    assert oauth.store.all() == [] and not (oauth.store.directory).exists()


# --- the token store ------------------------------------------------------------------------


async def test_token_file_readable_by_others_is_refused_with_the_fix(oauth: OAuth) -> None:
    await sign_in(oauth)
    path = oauth.store.path("test", USER)
    os.chmod(path, 0o644)
    with pytest.raises(TokenStoreError, match=f"mode 0644 .* chmod 600 {path}"):
        await oauth.access_token("test")
    auth = oauth.authorization("test")
    assert not auth.granted and auth.reason is not None and f"chmod 600 {path}" in auth.reason
    server = oauth.settings.servers["up"]
    with pytest.raises(Held, match=r"Not granted .* chmod 600") as held:
        await Session("up", server, "relay.test", oauth=oauth).open()  # no connection made
    assert held.value.retry_at is not None and held.value.retry_at > time.time()
    os.chmod(path, 0o600)
    assert await oauth.access_token("test")


def test_token_is_written_atomically_with_private_modes(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens")
    token = StoredToken("c", "a@example.com", "google", "authorization_code",
                        access_token="A", refresh_token="R")
    path = store.save(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert store.load("c", "a@example.com") == token
    assert "A" not in repr(token).replace("authorization_code", "").replace("a@", "")
    store.save(dataclasses.replace(token, access_token="B"))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    path.write_text("{not json")
    with pytest.raises(TokenStoreError, match=r"damaged .* oauth authorize"):
        store.load("c", "a@example.com")


# --- refreshing -------------------------------------------------------------------------------


async def test_concurrent_deliveries_share_one_refresh(oauth: OAuth,
                                                       provider: AuthServer) -> None:
    await sign_in(oauth)
    old = due(oauth)
    tokens = await asyncio.gather(*(oauth.access_token("test") for _ in range(8)))
    assert len(set(tokens)) == 1 and tokens[0] != old.access_token
    assert provider.count("refresh_token ok") == 1
    assert await oauth.access_token("test") == tokens[0]  # fresh now: no request
    assert provider.count("refresh_token ok") == 1
    expiry = sample(oauth.metrics, "relay_oauth_token_expiry_timestamp_seconds", client="test")
    assert expiry is not None and expiry > time.time() + 3000
    assert sample(oauth.metrics, "relay_oauth_refresh_total", client="test", result="ok") == 1


async def test_rotated_refresh_token_is_stored_and_the_next_refresh_uses_it(
        oauth: OAuth, provider: AuthServer) -> None:
    await sign_in(oauth)
    first = due(oauth)
    await oauth.access_token("test")
    second = due(oauth)
    assert second.refresh_token != first.refresh_token
    assert first.refresh_token is not None and second.refresh_token is not None
    assert not provider.refresh_token_active(first.refresh_token)
    await oauth.access_token("test")
    assert provider.count("refresh_token ok") == 2
    assert provider.count("refresh_token invalid_grant") == 0
    assert stat.S_IMODE(oauth.store.path("test", USER).stat().st_mode) == 0o600


async def test_refresh_token_kept_when_the_provider_does_not_rotate(
        oauth: OAuth, provider: AuthServer) -> None:
    provider.rotate = False
    await sign_in(oauth)
    first = due(oauth)
    await oauth.access_token("test")
    assert due(oauth).refresh_token == first.refresh_token


async def test_revoked_refresh_token_makes_it_not_granted_with_what_to_do(
        oauth: OAuth, provider: AuthServer) -> None:
    await sign_in(oauth)
    due(oauth)
    provider.revoke_user()
    with pytest.raises(NotGranted, match=r"refused the refresh token .*\(invalid_grant.* "
                                         r"`sysmail-relay oauth authorize test`"):
        await oauth.access_token("test")
    auth = oauth.authorization("test")
    assert not auth.granted and auth.reason and "oauth authorize test" in auth.reason
    assert "Testing" not in auth.reason  # not Google
    stored = oauth.store.load("test", USER)
    assert stored is not None and stored.access_token is None and stored.refresh_token is None
    metrics = oauth.metrics
    assert sample(metrics, "relay_oauth_refresh_total", client="test",
                  result="invalid_grant") == 1
    assert sample(metrics, "relay_oauth_token_expiry_timestamp_seconds", client="test") == 0
    with pytest.raises(NotGranted):  # no more requests to the provider
        await oauth.access_token("test")
    assert provider.count("refresh_token invalid_grant") == 1
    report = status.render(status.collect(oauth.settings))
    assert "OAuth authorization" in report and "Not granted" in report
    await sign_in(oauth)
    assert oauth.authorization("test").granted and await oauth.access_token("test")


async def test_google_refresh_token_refused_within_a_week_names_the_testing_status(
        tmp_path: Path, provider: AuthServer) -> None:
    oauth = OAuth(make_settings(tmp_path, provider, provider="google", scopes=None),
                  Metrics())
    await sign_in(oauth)
    request = provider.authorize_requests[-1]
    assert request["access_type"] == "offline" and request["prompt"] == "consent"
    assert request["scope"].split() == ["https://mail.google.com/", "openid", "email"]
    due(oauth)
    age(oauth, granted_at=time.time() - 6.9 * 86400)
    provider.revoke_user()
    with pytest.raises(NotGranted, match=r"issued 6.9 days ago.*\"Testing\" publishing status.*"
                                         r"7 days"):
        await oauth.access_token("test")


async def test_google_sign_in_as_another_account_is_refused(tmp_path: Path,
                                                            provider: AuthServer) -> None:
    oauth = OAuth(make_settings(tmp_path, provider, provider="google", scopes=None),
                  Metrics())
    provider.user = "someone.else@example.com"
    answer = answer_of(oauth.start_authorization("test", REDIRECT))
    with pytest.raises(OAuthError, match=r"signed in as someone\.else@example\.com, but the "
                                         r"relay sends as notify@example\.com"):
        await oauth.finish_authorization(answer["state"], answer["code"], None)
    assert oauth.store.all() == []


async def test_provider_down_is_temporary_and_the_authorization_stays(
        oauth: OAuth, provider: AuthServer) -> None:
    await sign_in(oauth)
    due(oauth)
    provider.stop()
    try:
        with pytest.raises(ProviderUnreachable, match="cannot reach the token endpoint"):
            await oauth.access_token("test")
        assert oauth.authorization("test").granted
        assert sample(oauth.metrics, "relay_oauth_refresh_total", client="test",
                      result="unreachable") == 1
    finally:
        provider.start()
    assert await oauth.access_token("test")


async def test_idle_relay_uses_its_refresh_token_every_few_days(oauth: OAuth,
                                                                provider: AuthServer) -> None:
    await sign_in(oauth)
    await oauth.keep_alive()
    assert provider.count("refresh_token ok") == 0
    age(oauth, refreshed_at=time.time() - IDLE_REFRESH - 60)
    await oauth.keep_alive()
    assert provider.count("refresh_token ok") == 1
    await oauth.keep_alive()
    assert provider.count("refresh_token ok") == 1


async def test_client_credentials_fetches_tokens_without_anyone_signing_in(
        tmp_path: Path, provider: AuthServer) -> None:
    oauth = OAuth(make_settings(tmp_path, provider, grant="client_credentials"), Metrics())
    assert not oauth.authorization("test").granted
    with pytest.raises(OAuthError, match="nobody signs in"):
        oauth.start_authorization("test", REDIRECT)
    await oauth.keep_alive()  # the daemon fetches it at start
    assert oauth.authorization("test").granted
    token = await oauth.access_token("test")
    assert await oauth.fresh_token("test", token) != token
    assert provider.count("client_credentials ok") == 2


def test_provider_parameters_for_google_and_microsoft(tmp_path: Path,
                                                      provider: AuthServer) -> None:
    google = make_settings(tmp_path, provider, provider="google", scopes=None,
                           authorize_url=None, token_url=None, revocation_url=None,
                           device_url=None).oauth_clients["test"]
    url = ProviderClient("g", google).authorization_url(REDIRECT, "S", "v" * 43, USER)
    query = parse_qs(urlsplit(url).query)
    assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    assert query["scope"] == ["https://mail.google.com/ openid email"]
    assert query["access_type"] == ["offline"] and query["code_challenge_method"] == ["S256"]
    ms = google.model_copy(update={"provider": "microsoft", "tenant": "contoso.example"})
    endpoints = ProviderClient("m", ms).endpoints
    assert endpoints.token_url == \
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    assert endpoints.scopes == ["https://outlook.office.com/SMTP.Send", "offline_access"]
    assert endpoints.device_url and endpoints.revocation_url is None
    app = ms.model_copy(update={"grant": "client_credentials"})
    assert ProviderClient("m", app).endpoints.scopes == ["https://outlook.office365.com/.default"]


# --- revoking -----------------------------------------------------------------------------------


async def test_revoke_forgets_locally_and_revokes_at_the_provider(
        oauth: OAuth, provider: AuthServer) -> None:
    await sign_in(oauth)
    stored = oauth.store.load("test", USER)
    assert stored is not None and stored.refresh_token
    text = await asyncio.to_thread(oauth_flow.revoke, oauth.settings, None)
    assert "revoked at the provider" in text and "Not granted" in text
    assert not provider.refresh_token_active(stored.refresh_token)
    assert oauth.store.all() == [] and not oauth.authorization("test").granted


# --- XOAUTH2: a refused token is replaced once ------------------------------------------------


async def xoauth2_server(accept: set[int]) -> tuple[asyncio.Server, list[str]]:
    """SMTP that offers only XOAUTH2 and accepts the AUTH attempts numbered in `accept`
    (1-based), refusing the others as Gmail does: 334 with a base64 JSON error, then 535."""
    tokens: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        while line := await reader.readline():
            command = line.decode().strip()
            if command.upper().startswith("EHLO"):
                writer.write(b"250-fake\r\n250 AUTH XOAUTH2\r\n")
            elif command.upper().startswith("AUTH XOAUTH2"):
                decoded = base64.b64decode(command.split()[2]).decode()
                tokens.append(decoded.split("auth=Bearer ")[1].rstrip("\x01"))
                if len(tokens) in accept:
                    writer.write(b"235 2.7.0 Accepted\r\n")
                    continue
                error = base64.b64encode(b'{"status":"401","schemes":"bearer"}')
                writer.write(b"334 " + error + b"\r\n")
                await reader.readline()
                writer.write(b"535 5.7.8 Username and Password not accepted\r\n")
            elif command.upper().startswith("QUIT"):
                writer.write(b"221 bye\r\n")
                break
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), tokens


@pytest.mark.parametrize(("accept", "refreshes"), [({1}, 0), ({2}, 1), (set(), 1)])
async def test_refused_token_is_refreshed_once_and_retried_once(
        tmp_path: Path, provider: AuthServer, accept: set[int], refreshes: int) -> None:
    server, tokens = await xoauth2_server(accept)
    async with server:
        port = server.sockets[0].getsockname()[1]
        oauth = OAuth(make_settings(tmp_path, provider, port=port), Metrics())
        await sign_in(oauth)
        session = Session("up", oauth.settings.servers["up"], "relay.test", oauth=oauth)
        if accept:
            await session.open()
        else:
            with pytest.raises(AuthenticationFailure, match="a new token was refused too") as e:
                await session.open()
            assert "password" not in e.value.reply
        await session.quit()
    assert len(tokens) == 1 + refreshes and len(set(tokens)) == len(tokens)
    assert provider.count("refresh_token ok") == refreshes


async def test_check_connect_shows_the_token_step_without_the_token(
        tmp_path: Path, provider: AuthServer) -> None:
    server, tokens = await xoauth2_server({1})
    lines: list[str] = []
    async with server:
        port = server.sockets[0].getsockname()[1]
        oauth = OAuth(make_settings(tmp_path, provider, port=port), Metrics())
        await sign_in(oauth)
        assert await probe("up", oauth.settings.servers["up"], "relay.test", lines.append,
                           oauth=oauth)
    steps = [line.split()[0] for line in lines]
    assert steps[:2] == ["OAuth", "connect"] and "AUTH" in steps
    assert "ok for notify@example.com (client test; token not shown)" in lines[0]
    assert tokens[0] not in "\n".join(lines)


# --- secrets ----------------------------------------------------------------------------------


async def test_no_token_or_secret_in_logs_status_metrics_or_errors(
        oauth: OAuth, provider: AuthServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    await sign_in(oauth)
    due(oauth)
    await oauth.access_token("test")
    provider.revoke_user()
    due(oauth)
    try:
        await oauth.access_token("test")
    except NotGranted as e:
        errors += [str(e), repr(e)]
    report = status.collect(oauth.settings)
    visible = "\n".join([caplog.text, *errors, json.dumps(report), status.render(report),
                         generate_latest(oauth.metrics.registry).decode(),
                         oauth_flow.status(oauth.settings, True), repr(oauth.store.all())])
    assert "Not granted" in visible
    for secret in [*provider.issued(), CLIENT_SECRET]:
        assert secret not in visible


async def test_provider_error_description_is_shown_sanitized_and_bounded() -> None:
    """A provider may echo what it was sent in error_description: `check` and the logs
    show its error code and a description without it, without control characters, and
    at most DESCRIPTION_MAX characters of it."""
    refresh_token = "1//0gRefresh-Token-Never-Show-Me"
    description = (f"refresh_token {refresh_token} is invalid for client {CLIENT_ID} "
                   f"(secret {CLIENT_SECRET})\x1b[2J\r\nInjected: line" + " padding" * 500)

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid_grant", "error_description": description},
                                 status=400)

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        cfg = OAuthClientSettings.model_validate({
            "provider": "generic", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "authorize_url": f"http://127.0.0.1:{port}/authorize",
            "token_url": f"http://127.0.0.1:{port}/token", "scopes": ["smtp"]})
        with pytest.raises(ProviderRefused) as refused:
            await ProviderClient("test", cfg).refresh(refresh_token)
    finally:
        await runner.cleanup()
    shown = str(refused.value)
    assert refused.value.error == "invalid_grant" and "invalid_grant" in shown
    assert refresh_token not in shown and CLIENT_SECRET not in shown
    assert "[sent value]" in shown
    assert "\x1b" not in shown and "\r" not in shown and "\n" not in shown
    assert len(refused.value.description or "") <= DESCRIPTION_MAX + 40
    assert len(shown) < 500
