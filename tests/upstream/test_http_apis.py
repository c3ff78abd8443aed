"""Graph and Gmail API upstreams, in a relay in this process, over real HTTP.

The relay takes mail on its SMTP listener and sends it to the strict stand-ins of
tests/api_servers.py (written from the published reference; the real Microsoft and
Google endpoints are not reached), with tokens from the test OAuth server
(tests/oauth_server.py: client_credentials with a client secret, or the
authorization code flow), which the stand-ins check by introspection.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from relay.admin import queue as queue_admin
from relay.app import Relay
from relay.upstream.http_api import ApiUpstream
from relay.upstream.http_client import retry_after
from tests.api_servers import GmailServer, GraphServer
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer, redirect_query
from tests.support import RawSMTP, RelayFactory, listener_port, wait_until
from tests.upstream_servers import Script, Servers

FAST_RETRY = {"retry_initial": "0.2s", "retry_max": "0.4s"}
OTHER = "other@example.com"


@pytest.fixture(scope="module")
def authority() -> Iterator[AuthServer]:
    server = AuthServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def graph_server(authority: AuthServer) -> Iterator[GraphServer]:
    server = GraphServer(f"{authority.url}/introspect", {USER, OTHER})
    yield server
    server.close()


@pytest.fixture(scope="module")
def gmail_server(authority: AuthServer) -> Iterator[GmailServer]:
    server = GmailServer(f"{authority.url}/introspect", {USER, OTHER})
    yield server
    server.close()


@pytest.fixture
def provider(authority: AuthServer) -> AuthServer:
    authority.reset()
    authority.app_permissions[CLIENT_ID] = {"Mail.Send"}  # admin consent for Graph
    return authority


@pytest.fixture
def graph(graph_server: GraphServer, provider: AuthServer) -> GraphServer:
    graph_server.reset()
    graph_server.can_read_users = True
    return graph_server


@pytest.fixture
def gmail(gmail_server: GmailServer, provider: AuthServer) -> GmailServer:
    gmail_server.reset()
    return gmail_server


def client(provider: AuthServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "generic", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "grant": "client_credentials", "token_url": f"{provider.url}/token", **extra}


def api_sections(protocol: str, url: str, provider: AuthServer, *,
                 server: dict[str, Any] | None = None, app: dict[str, Any] | None = None,
                 servers: dict[str, Any] | None = None) -> dict[str, Any]:
    key = "graph_url" if protocol == "graph" else "gmail_url"
    return {
        "system_account": {"address": USER, "server": "api"},
        "servers": {"api": {"protocol": protocol, key: url, "timeout": 5,
                            "oauth": {"client": "app"}, **(server or {})}, **(servers or {})},
        "oauth_clients": {"app": client(provider, **(app or {}))},
        "queue": FAST_RETRY,
    }


async def submit(relay: Relay, message: bytes, *rcpts: str) -> str:
    smtp = await RawSMTP.connect(listener_port(relay))
    await smtp.cmd("EHLO app.example.com")
    reply = await smtp.transaction(message + b".\r\n", rcpts=rcpts or ("boss@example.com",))
    await smtp.close()
    assert reply.startswith("250"), reply
    return reply.rsplit(" ", 1)[1]


def message(subject: str = "Approval request", headers: str = "To: boss@example.com\r\n",
            body: bytes = b"Please approve.\r\n") -> bytes:
    return (f"From: Workflow <workflow@apps.example.com>\r\n{headers}Subject: {subject}\r\n"
            "\r\n").encode() + body


def counter(relay: Relay, result: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "relay_deliveries_total", {"server": "api", "result": result})
    return value or 0.0


def upstream(relay: Relay) -> ApiUpstream:
    assert relay.scheduler is not None
    found = relay.scheduler.upstream
    assert isinstance(found, ApiUpstream)
    return found


async def dead_reason(relay: Relay, queue_id: str) -> str:
    await wait_until(lambda: relay.spool.ids("dead") == [queue_id])
    reason = relay.spool.read(queue_id, "dead").dead_reason
    assert reason is not None
    return reason


# --- sending --------------------------------------------------------------------------


async def test_graph_takes_the_message_as_base64_mime_with_an_app_token(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections("graph", graph.url, provider))
    queue_id = await submit(relay, message())
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    (sent,) = graph.delivered()
    assert sent.mailbox == USER and sent.sender == USER  # the system account sends
    assert sent.recipients == {"boss@example.com"}
    assert graph.answers == [202]
    assert provider.count("client_credentials ok") == 1
    assert counter(relay, "ok") == 1
    assert b"Please approve." in sent.seen


async def test_gmail_takes_the_message_as_rfc822_with_a_signed_in_token(
        relay_factory: RelayFactory, gmail: GmailServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections(
        "gmail_api", gmail.url, provider, app={"grant": "authorization_code",
                                               "authorize_url": f"{provider.url}/authorize"}))
    answer = redirect_query(relay.oauth.start_authorization("app", "http://127.0.0.1:9/"))
    await relay.oauth.finish_authorization(answer["state"], answer["code"], None)
    queue_id = await submit(relay, message())
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    (sent,) = gmail.delivered()
    assert sent.mailbox == USER and sent.recipients == {"boss@example.com"}
    assert gmail.answers == [200]
    token = relay.oauth.store.load("app", USER)
    assert token is not None and "https://www.googleapis.com/auth/gmail.send" in token.scopes


@pytest.mark.parametrize("protocol", ["graph", "gmail_api"])
async def test_exactly_the_envelope_recipients_receive_it_whatever_the_headers_say(
        relay_factory: RelayFactory, graph: GraphServer, gmail: GmailServer,
        provider: AuthServer, protocol: str) -> None:
    """To, Cc and Bcc each hold one envelope recipient and one that is not; one envelope
    recipient is in no header at all."""
    api = graph if protocol == "graph" else gmail
    relay = await relay_factory(**api_sections(protocol, api.url, provider))
    headers = ("To: Boss <boss@example.com>, Not Me <to-only@example.com>\r\n"
               "Cc: deputy@example.com, cc-only@example.com\r\n"
               "Bcc: audit@example.com, bcc-only@example.com\r\n")
    envelope = ("boss@example.com", "deputy@example.com", "audit@example.com",
                "envelope-only@example.com")
    queue_id = await submit(relay, message(headers=headers), *envelope)
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    (sent,) = api.delivered()
    assert sent.recipients == set(envelope)
    seen = message_from_bytes(sent.seen)
    assert seen["To"] == "Boss <boss@example.com>"
    assert seen["Cc"] == "deputy@example.com"
    assert seen["Bcc"] is None  # the Bcc recipients are invisible to the others
    for stranger in (b"to-only@", b"cc-only@", b"bcc-only@"):
        assert stranger not in sent.seen
    assert seen["Subject"] == "Approval request"


async def test_message_over_graphs_4_mb_fails_before_anything_is_sent(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections("graph", graph.url, provider))
    big = message(body=b"x" * 76 + b"\r\n") + (b"y" * 76 + b"\r\n") * 42_000
    assert len(base64.b64encode(big)) > 4 * 1024 * 1024 > len(big)
    queue_id = await submit(relay, big)
    reason = await dead_reason(relay, queue_id)
    assert "too large for Microsoft Graph" in reason and "fallback_server" in reason
    assert graph.answers == []  # not even a token request went to Graph
    assert counter(relay, "failed") == 1


async def test_message_over_graphs_limit_goes_to_the_fallback_server(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    servers = Servers()
    script = Script()
    port = await servers.smtp(script)
    try:
        relay = await relay_factory(**api_sections(
            "graph", graph.url, provider, server={"fallback_server": "smtp"},
            servers={"smtp": {"host": "127.0.0.1", "port": port, "encryption": "none"}}))
        big = message(subject="big") + (b"y" * 76 + b"\r\n") * 42_000
        small = await submit(relay, message(subject="small"))
        large = await submit(relay, big)
        await wait_until(lambda: relay.spool.find(small) is None
                         and relay.spool.find(large) is None)
    finally:
        await servers.close()
    assert [d.seen.count(b"Subject: small") for d in graph.delivered()] == [1]
    (through_smtp,) = script.messages
    assert b"Subject: big" in through_smtp.data and through_smtp.rcpt_tos == [
        "boss@example.com"]


# --- what the APIs answer --------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503, 504])
async def test_graph_busy_defers_pauses_for_retry_after_and_delivers_once(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer,
        status: int, caplog: pytest.LogCaptureFixture) -> None:
    graph.retry_after = "1"
    graph.fail_next(status, times=2)
    relay = await relay_factory(**api_sections("graph", graph.url, provider))
    with caplog.at_level(logging.INFO):
        queue_id = await submit(relay, message())
        await wait_until(lambda: relay.spool.find(queue_id) is None, within=20)
    assert graph.answers == [status, status, 202]
    assert len(graph.delivered()) == 1
    assert counter(relay, "deferred") == 2 and counter(relay, "ok") == 1
    assert "(Retry-After: 1 s)" in caplog.text


async def test_gmail_rate_limit_403_is_deferred_like_429(
        relay_factory: RelayFactory, gmail: GmailServer, provider: AuthServer) -> None:
    gmail.fail_next(403, code="userRateLimitExceeded")
    gmail.fail_next(429)
    gmail.retry_after = "1"
    relay = await relay_factory(**api_sections("gmail_api", gmail.url, provider))
    queue_id = await submit(relay, message())
    await wait_until(lambda: relay.spool.find(queue_id) is None, within=60)
    assert gmail.answers == [403, 429, 200]
    assert len(gmail.delivered()) == 1 and counter(relay, "failed") == 0


async def test_graph_401_gets_a_new_token_and_the_message_goes(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections("graph", graph.url, provider))
    first = await submit(relay, message(subject="first"))
    await wait_until(lambda: relay.spool.find(first) is None)
    provider.expire_access_tokens()  # the stored token still looks valid to the relay
    second = await submit(relay, message(subject="second"))
    await wait_until(lambda: relay.spool.find(second) is None)
    assert graph.answers == [202, 401, 202]
    assert provider.count("client_credentials ok") == 2
    assert len(graph.delivered()) == 2 and counter(relay, "deferred") == 0


async def test_graph_401_twice_holds_the_mail_as_not_granted_and_never_bounces(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    graph.fail_next(401, times=2)
    relay = await relay_factory(**api_sections("graph", graph.url, provider))
    queue_id = await submit(relay, message())
    await wait_until(lambda: len(graph.answers) == 2)
    assert relay.scheduler is not None
    await wait_until(lambda: relay.scheduler.server_state() == "not granted")  # type: ignore[union-attr]
    await wait_until(lambda: relay.scheduler.counts()["held"] == 1)  # type: ignore[union-attr]
    assert relay.spool.ids("dead") == [] and counter(relay, "failed") == 0
    assert relay.metrics.registry.get_sample_value(
        "relay_auth_failures_total", {"server": "api", "method": "Bearer"}) == 2
    last = relay.scheduler.health["api"].last_error or ""
    assert "HTTP 401" in last and "Mail.Send" in last
    # once the app is fixed, `sysmail-relay queue retry --all` (or the hold's next look,
    # a minute later) sends it, once
    await asyncio.to_thread(queue_admin.retry_all, relay.spool)
    await relay.rescan()
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    assert graph.answers == [401, 401, 202] and len(graph.delivered()) == 1


@pytest.mark.parametrize(("status", "code", "says"), [
    (403, "ErrorSendAsDenied", "Send As"),
    (403, "ErrorAccessDenied", "application access policy"),
    (400, "ErrorInvalidRecipients", "ErrorInvalidRecipients: switched to answer 400"),
    (413, None, "too large"),
    (404, None, "no mailbox notify@example.com"),
])
async def test_graph_refusals_fail_the_message_and_say_why(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer,
        status: int, code: str | None, says: str) -> None:
    graph.fail_next(status, code=code)
    relay = await relay_factory(**api_sections("graph", graph.url, provider))
    queue_id = await submit(relay, message())
    reason = await dead_reason(relay, queue_id)
    assert f"HTTP {status}" in reason and says in reason
    assert graph.answers == [status] and counter(relay, "failed") == 1


async def test_graph_unknown_mailbox_fails_naming_the_address(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections(
        "graph", graph.url, provider, server={"oauth": {"client": "app",
                                                        "username": "nobody@example.com"}}))
    reason = await dead_reason(relay, await submit(relay, message()))
    assert "HTTP 404" in reason and "ErrorInvalidUser" in reason
    assert "no mailbox nobody@example.com" in reason


async def test_gmail_token_without_the_send_scope_fails_naming_the_scope(
        relay_factory: RelayFactory, gmail: GmailServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections("gmail_api", gmail.url, provider,
                                               app={"scopes": ["smtp"]}))
    reason = await dead_reason(relay, await submit(relay, message()))
    assert "insufficientPermissions" in reason
    assert "https://www.googleapis.com/auth/gmail.send" in reason


async def test_gmail_delegation_denied_is_explained(
        relay_factory: RelayFactory, gmail: GmailServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections(
        "gmail_api", gmail.url, provider, server={"oauth": {"client": "app",
                                                            "username": OTHER}}))
    reason = await dead_reason(relay, await submit(relay, message()))
    assert "Delegation denied" in reason and f"may not send as {OTHER}" in reason


async def test_gmail_bad_request_fails_with_googles_reason(
        relay_factory: RelayFactory, gmail: GmailServer, provider: AuthServer) -> None:
    gmail.fail_next(400, code="failedPrecondition")
    relay = await relay_factory(**api_sections("gmail_api", gmail.url, provider))
    reason = await dead_reason(relay, await submit(relay, message()))
    assert "HTTP 400 (failedPrecondition" in reason


async def test_api_that_cannot_be_reached_defers_naming_the_url_key(
        relay_factory: RelayFactory, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections("graph", "http://127.0.0.1:1", provider))
    queue_id = await submit(relay, message())
    assert relay.scheduler is not None
    await wait_until(lambda: counter(relay, "deferred") >= 1)
    last = relay.scheduler.health["api"].last_error or ""
    assert "cannot reach api (Microsoft Graph at http://127.0.0.1:1)" in last
    assert "servers.api.graph_url" in last
    assert relay.spool.find(queue_id) is not None and relay.spool.ids("dead") == []


async def test_rate_limit_applies_to_an_api_server(
        relay_factory: RelayFactory, graph: GraphServer, provider: AuthServer) -> None:
    relay = await relay_factory(**api_sections("graph", graph.url, provider,
                                               server={"rate_limit": "1/h"}))
    first = await submit(relay, message(subject="first"))
    second = await submit(relay, message(subject="second"))
    await wait_until(lambda: [relay.spool.find(q) for q in (first, second)].count(None) == 1)
    assert relay.scheduler is not None
    assert relay.scheduler.counts()["deferred"] + relay.scheduler.counts()["queued"] == 1
    assert upstream(relay).not_before() > 0 and graph.answers == [202]


async def test_https_api_with_a_private_ca_is_refused_until_ca_file_names_it(
        relay_factory: RelayFactory, provider: AuthServer, tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    server = GraphServer(f"{provider.url}/introspect", {USER}, tls)
    try:
        assert server.url.startswith("https://")
        relay = await relay_factory(**api_sections("graph", server.url, provider))
        queue_id = await submit(relay, message())
        assert relay.scheduler is not None
        await wait_until(lambda: counter(relay, "deferred") >= 1)
        last = relay.scheduler.health["api"].last_error or ""
        assert "TLS certificate of api (Microsoft Graph at https://127.0.0.1:" in last
        assert 'servers.api.ca_file = "/path/to/ca.pem"' in last and server.answers == []
        await relay.stop(grace=1)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        relay = await relay_factory(**api_sections("graph", server.url, provider,
                                                   server={"ca_file": tmp_path / "ca.pem"}))
        await wait_until(lambda: relay.spool.find(queue_id) is None)
        assert server.answers == [202] and len(server.delivered()) == 1
        await relay.stop(grace=1)
    finally:
        server.close()


NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "seconds"), [
    ("120", 120.0), ("", None), ("soon", None),
    (format_datetime(NOW + timedelta(hours=1), usegmt=True), 3600.0),
    (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),
])
def test_retry_after_is_read_as_seconds_or_an_http_date(value: str,
                                                         seconds: float | None) -> None:
    response = httpx.Response(503, headers={"Retry-After": value} if value else {})
    assert retry_after(response, now=NOW.timestamp()) == seconds
