"""The SMTP upstream under faults, against real servers on 127.0.0.1 in the test's loop.

Each test scripts an aiosmtpd server (or a raw asyncio one for misbehaviour aiosmtpd
cannot produce) and proves one behaviour of the pool (`relay.upstream.smtp_pool`) or
of a session over aiosmtplib's public API (`relay.upstream.smtp`): timeouts that name
the stage, failures classified temporary or permanent, connection reuse, one command
at a time, per-recipient results, STARTTLS and certificates, AUTH and its back-off,
pacing, ESMTP pass-through and `check --connect`'s probe.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay.errors import (
    AuthenticationFailure,
    DeliveryFailure,
    PermanentFailure,
    SaslError,
    TemporaryFailure,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.spool.store import INLINE_BYTES, Envelope, Recipient
from relay.upstream import network
from relay.upstream import smtp_pool as smtp_client
from relay.upstream.base import Outcome, Outgoing, classify, explain, slow_down_requested
from relay.upstream.message import Body
from relay.upstream.probe import probe
from relay.upstream.smtp_pool import RateLimited, SmtpUpstream
from tests.support import free_port, wait_until
from tests.upstream_servers import (
    Pipelined,
    Script,
    Servers,
    banner,
    dribbling_ehlo,
    hangs_up_in_data,
    never_answers,
)

SENDER = "notify@example.com"
BODY = (b"From: notify@example.com\r\n"
        b"To: a@example.com\r\n"
        b"Subject: disk almost full\r\n"
        b"\r\n"
        b"/var is 91% full.\r\n")
EIGHT_BIT = (b"From: notify@example.com\r\n"
             b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n"
             b"\r\n"
             + "Grüße aus Köln\r\n".encode())
PASSWORD = "s3cret-Never-Print-Me"


class Client:
    """Builds upstreams and messages the way the delivery scheduler does."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.upstreams: list[SmtpUpstream] = []
        self.count = 0

    def settings(self, port: int, **server: Any) -> ServerSettings:
        return ServerSettings(**{"host": "127.0.0.1", "port": port, "encryption": "none",
                                 "timeout": 1, **server})

    def upstream(self, port: int, **server: Any) -> SmtpUpstream:
        upstream = SmtpUpstream("test", self.settings(port, **server), Metrics(), "relay.test")
        self.upstreams.append(upstream)
        return upstream

    def message(self, *recipients: str | Recipient, data: bytes = BODY,
                mail_options: list[str] | None = None, in_memory: bool = True) -> Outgoing:
        self.count += 1
        rcpts = [r if isinstance(r, Recipient) else Recipient(r)
                 for r in recipients or ("a@example.com",)]
        envelope = Envelope(id=f"MSG{self.count}", sender="app@example.com", recipients=rcpts,
                            mail_from=SENDER, mail_options=mail_options or [], size=len(data))
        path = self.tmp_path / f"message-{self.count}"
        path.write_bytes(data)
        preload = data if in_memory and len(data) <= INLINE_BYTES else None
        return Outgoing(envelope, path, SENDER, envelope.recipients, preload)

    async def close(self) -> None:
        for upstream in self.upstreams:
            await upstream.close()


@pytest.fixture(params=["one command at a time", "pipelined"])
async def servers(request: pytest.FixtureRequest) -> AsyncIterator[Servers]:
    started = Servers(pipelining=request.param == "pipelined")
    yield started
    await started.close()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    made = Client(tmp_path)
    yield made
    await made.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="upstream test CA")


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def sessions_gauge(upstream: SmtpUpstream) -> float | None:
    return upstream.metrics.registry.get_sample_value(
        "relay_upstream_sessions", {"server": "test"})


def auth_failures(upstream: SmtpUpstream, method: str) -> float | None:
    return upstream.metrics.registry.get_sample_value(
        "relay_auth_failures_total", {"server": "test", "method": method})


def delivered(outcomes: list[Outcome]) -> bool:
    return bool(outcomes) and all(o.failure is None and o.reply.startswith("250")
                                  for o in outcomes)


def by_recipient(outcomes: list[Outcome]) -> dict[str, Outcome]:
    return {o.recipient: o for o in outcomes}


# --- 1. timeouts name the stage -----------------------------------------------------------


async def test_server_that_never_sends_a_banner_says_no_greeting_not_connect_timeout(
        servers: Servers, client: Client) -> None:
    upstream = client.upstream(await servers.raw(never_answers))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await upstream.deliver(client.message())
    assert time.monotonic() - started < 3
    assert caught.value.stage == "connect"
    assert "no greeting within 1 s from test (127.0.0.1:" in caught.value.reply
    assert "timeout after" not in caught.value.reply
    assert sessions_gauge(upstream) in (None, 0)


async def test_unanswered_final_dot_times_out_naming_data(
        servers: Servers, client: Client) -> None:
    script = Script(data_gate=asyncio.Event())  # never set: DATA's reply never comes
    upstream = client.upstream(await servers.smtp(script))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await upstream.deliver(client.message())
    assert time.monotonic() - started < 3
    assert caught.value.stage == "DATA"
    assert "timeout after 1 s waiting for the reply to DATA" in caught.value.reply
    assert script.data_started == 1  # the server did get the whole message
    assert sessions_gauge(upstream) == 0


async def test_reply_dribbled_one_byte_at_a_time_is_cut_off_at_the_timeout(
        servers: Servers, client: Client) -> None:
    upstream = client.upstream(await servers.raw(dribbling_ehlo(0.5)))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await upstream.deliver(client.message())
    assert time.monotonic() - started < 3  # the whole reply would take 20 s
    assert caught.value.stage == "EHLO"
    assert "waiting for the reply to EHLO" in caught.value.reply


# --- 2. refused, and a hang-up in the middle of DATA ---------------------------------------


async def test_refused_connection_is_unreachable_then_delivered_once_server_is_up(
        servers: Servers, client: Client) -> None:
    port = free_port()
    upstream = client.upstream(port)
    message = client.message()
    with pytest.raises(UpstreamUnreachable) as caught:
        await upstream.deliver(message)
    assert caught.value.stage == "connect"
    assert isinstance(caught.value, TemporaryFailure)
    script = Script()
    await servers.smtp(script, port=port)
    assert delivered(await upstream.deliver(message))
    assert [m.data for m in script.messages] == [BODY]


async def test_server_closing_mid_data_is_a_temporary_failure_never_success(
        servers: Servers, client: Client) -> None:
    upstream = client.upstream(await servers.raw(hangs_up_in_data))
    with pytest.raises(DeliveryFailure) as caught:
        await upstream.deliver(client.message(data=BODY * 200))
    assert isinstance(caught.value, TemporaryFailure)
    assert caught.value.stage == "DATA"
    assert sessions_gauge(upstream) == 0


# --- 3. connection reuse ------------------------------------------------------------------


async def test_five_messages_in_a_row_use_one_connection_and_five_transactions(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    for _ in range(5):
        assert delivered(await upstream.deliver(client.message()))
        assert sessions_gauge(upstream) == 1
    assert script.connections == 1
    assert len(script.messages) == 5
    assert all(m.data == BODY and m.mail_from == SENDER for m in script.messages)
    await upstream.close()
    assert sessions_gauge(upstream) == 0
    await wait_until(lambda: not script.live, within=2)


async def test_concurrent_deliveries_open_at_most_pool_size_connections(
        servers: Servers, client: Client) -> None:
    script = Script(data_gate=asyncio.Event())
    upstream = client.upstream(await servers.smtp(script), pool_size=2, timeout=10)
    tasks = [asyncio.create_task(upstream.deliver(client.message())) for _ in range(5)]
    await wait_until(lambda: script.in_data == 2, within=5)
    await asyncio.sleep(0.1)  # the other three are waiting for a session, not connecting
    assert script.connections == 2
    assert sessions_gauge(upstream) == 2
    assert script.data_gate is not None
    script.data_gate.set()
    results = await asyncio.gather(*tasks)
    assert all(delivered(r) for r in results)
    assert len(script.messages) == 5
    assert script.connections == 2 and script.max_live == 2
    assert sessions_gauge(upstream) == 2  # both idle in the pool
    await upstream.close()
    assert sessions_gauge(upstream) == 0


async def test_unused_pooled_connection_is_closed_after_the_idle_time(
        servers: Servers, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_client, "IDLE_CLOSE", 0.1)
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    assert delivered(await upstream.deliver(client.message()))
    assert len(script.live) == 1
    # the server may see the close before the relay has counted it
    await wait_until(lambda: not script.live and sessions_gauge(upstream) == 0, within=2)
    assert delivered(await upstream.deliver(client.message()))
    assert script.connections == 2


# --- 4. the server closes an idle pooled connection ---------------------------------------


@pytest.mark.parametrize("how", ["close", "close, next message at once", "421 then close",
                                 "421 to the next MAIL"])
async def test_idle_connection_closed_by_server_next_message_goes_over_a_new_one(
        servers: Servers, client: Client, how: str) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    assert delivered(await upstream.deliver(client.message()))
    if how.startswith("close"):
        assert script.hang_up_all() == 1
    elif how == "421 then close":
        assert script.hang_up_all("421 4.4.2 upstream.test Error: timeout exceeded") == 1
    else:
        script.mail_replies.append("421 4.3.2 upstream.test Service shutting down")
        script.hang_up_after.add("MAIL")
    if how != "close, next message at once":
        await asyncio.sleep(0.05)
    assert delivered(await upstream.deliver(client.message()))
    assert script.connections == 2
    assert len(script.messages) == 2
    assert sessions_gauge(upstream) == 1


async def test_transaction_on_a_connection_already_gone_fails_at_mail_from_unanswered(
        servers: Servers, client: Client) -> None:
    """What `_send` takes for a stale pooled connection (and retries on a new one)."""
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    assert delivered(await upstream.deliver(client.message()))
    (session,) = upstream._idle
    assert session.client.transport is not None
    session.client.transport.close()
    message = client.message()
    with pytest.raises(UpstreamUnreachable) as gone:
        await session.transaction(message, await Body.of(message))
    assert gone.value.code is None and session.stage == "MAIL FROM"
    assert "Connection lost" in gone.value.reply


async def test_sessions_gauge_still_counts_idle_session_after_a_failed_reconnect(
        servers: Servers, client: Client) -> None:
    script = Script(data_gate=asyncio.Event())
    upstream = client.upstream(await servers.smtp(script), pool_size=2, timeout=10)
    tasks = [asyncio.create_task(upstream.deliver(client.message())) for _ in range(2)]
    await wait_until(lambda: script.in_data == 2, within=5)
    assert script.data_gate is not None
    script.data_gate.set()
    await asyncio.gather(*tasks)
    assert sessions_gauge(upstream) == 2
    # one pooled connection is dropped by the server at the next MAIL, and the server
    # takes no new connections: the reconnect fails, the other session stays open
    script.mail_replies.append("421 4.3.2 upstream.test Service shutting down")
    script.hang_up_after.add("MAIL")
    await servers.stop_listening()
    with pytest.raises(UpstreamUnreachable):
        await upstream.deliver(client.message())
    await asyncio.sleep(0.05)
    assert len(script.live) == 1
    assert sessions_gauge(upstream) == 1


# --- 5, 6. per-recipient results ---------------------------------------------------------


async def test_mixed_rcpt_replies_deliver_the_accepted_recipient_and_fail_the_other(
        servers: Servers, client: Client) -> None:
    script = Script(rcpt_replies={"gone@example.com": ["550 5.1.1 <gone@example.com>: "
                                                       "Recipient address rejected"]})
    upstream = client.upstream(await servers.smtp(script))
    outcomes = by_recipient(await upstream.deliver(
        client.message("ok@example.com", "gone@example.com")))
    gone, ok = outcomes["gone@example.com"], outcomes["ok@example.com"]
    assert isinstance(gone.failure, PermanentFailure) and gone.failure.code == 550
    assert "550 5.1.1 <gone@example.com>: Recipient address rejected" in gone.reply
    assert ok.failure is None and ok.reply.startswith("250")
    assert [m.rcpt_tos for m in script.messages] == [["ok@example.com"]]


async def test_all_recipients_refused_sends_rset_and_reuses_the_session(
        servers: Servers, client: Client) -> None:
    script = Script(rcpt_replies={"x@example.com": ["550 5.1.1 no such user"],
                                  "y@example.com": ["553 5.1.3 bad recipient address syntax"]})
    upstream = client.upstream(await servers.smtp(script))
    outcomes = await upstream.deliver(client.message("x@example.com", "y@example.com"))
    assert [type(o.failure) for o in outcomes] == [PermanentFailure, PermanentFailure]
    assert script.rsets == 1
    assert script.messages == []
    assert delivered(await upstream.deliver(client.message("z@example.com")))
    assert script.connections == 1
    assert [m.rcpt_tos for m in script.messages] == [["z@example.com"]]


async def test_4xx_at_rcpt_is_deferred_then_delivered_at_the_next_attempt(
        servers: Servers, client: Client) -> None:
    script = Script(rcpt_replies={"a@example.com": ["450 4.2.0 Mailbox busy"]})
    upstream = client.upstream(await servers.smtp(script))
    message = client.message("a@example.com")
    (first,) = await upstream.deliver(message)
    assert isinstance(first.failure, TemporaryFailure) and first.failure.code == 450
    assert "450 4.2.0 Mailbox busy" in first.reply
    assert script.messages == []
    assert delivered(await upstream.deliver(message))
    assert [m.rcpt_tos for m in script.messages] == [["a@example.com"]]


@pytest.mark.parametrize(("reply", "kind"), [("451 4.3.0 Error: queue file write error",
                                              TemporaryFailure),
                                             ("554 5.7.1 Message rejected as spam",
                                              PermanentFailure)])
async def test_refusal_after_data_fails_the_message_and_the_next_one_is_delivered(
        servers: Servers, client: Client, reply: str, kind: type[DeliveryFailure]) -> None:
    script = Script(data_replies=[reply])
    upstream = client.upstream(await servers.smtp(script))
    with pytest.raises(kind) as caught:
        await upstream.deliver(client.message())
    assert caught.value.code == int(reply[:3]) and caught.value.stage == "DATA"
    assert reply in caught.value.reply
    assert delivered(await upstream.deliver(client.message()))
    assert len(script.messages) == 1


# --- 6b. one command at a time (aiosmtplib does not pipeline) -----------------------------

async def test_pipelining_server_gets_each_command_after_the_reply_to_the_one_before(
        servers: Servers, client: Client) -> None:
    """aiosmtplib writes a command, reads its reply, then writes the next, also to a
    server that offers PIPELINING: MAIL, each RCPT and DATA arrive in reads of their own."""
    server = Pipelined()
    upstream = client.upstream(await servers.raw(server))
    assert delivered(await upstream.deliver(client.message("a@example.com", "b@example.com")))
    assert server.reads[:4] == [b"MAIL FROM:<notify@example.com>\r\n",
                                b"RCPT TO:<a@example.com>\r\n", b"RCPT TO:<b@example.com>\r\n",
                                b"DATA\r\n"]
    assert server.messages == [BODY]


@pytest.mark.parametrize("dribble", [False, True], ids=["replies whole", "byte by byte"])
async def test_rcpt_replies_are_matched_to_their_recipients_in_order(
        servers: Servers, client: Client, dribble: bool) -> None:
    server = Pipelined(dribble=dribble, rcpt_replies={
        "b@example.com": b"550-5.1.1 <b@example.com>: no such user\r\n550 5.1.1 see the list",
        "c@example.com": b"451 4.7.1 greylisted"})
    upstream = client.upstream(await servers.raw(server))
    outcomes = by_recipient(await upstream.deliver(
        client.message("a@example.com", "b@example.com", "c@example.com", "d@example.com")))
    assert outcomes["a@example.com"].failure is None
    assert outcomes["d@example.com"].reply.startswith("250 2.0.0 queued")
    b, c = outcomes["b@example.com"].failure, outcomes["c@example.com"].failure
    assert isinstance(b, PermanentFailure) and b.code == 550 and "see the list" in b.reply
    assert isinstance(c, TemporaryFailure) and c.code == 451 and "greylisted" in c.reply
    assert server.messages == [BODY]


@pytest.mark.parametrize("garbage", [b"this is not SMTP", b"250-" + b"x" * 9000],
                         ids=["not a reply", "a line too long"])
async def test_malformed_reply_defers_the_message_and_drops_the_connection(
        servers: Servers, client: Client, garbage: bytes) -> None:
    async def babbler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        await reader.readline()
        writer.write(garbage + b"\r\n")
        await reader.read()

    upstream = client.upstream(await servers.raw(babbler))
    with pytest.raises(TemporaryFailure) as malformed:
        await upstream.deliver(client.message())
    expected = "Malformed SMTP response" if b"not SMTP" in garbage else "Response too long"
    assert expected in malformed.value.reply and len(malformed.value.reply) < 300
    assert "not an SMTP reply to MAIL FROM" in malformed.value.reply
    assert malformed.value.stage == "MAIL FROM" and malformed.value.code is None
    assert sessions_gauge(upstream) == 0  # not given back to the pool


class Flood:
    """A raw server that answers MAIL with `line` over and over (up to `limit` bytes, then
    `tail`) without reading what the client sends; it counts what it managed to write
    before the client hung up."""

    def __init__(self, line: bytes, tail: bytes, limit: int) -> None:
        self.line, self.tail, self.limit = line, tail, limit
        self.sent = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        await reader.readline()
        chunk = self.line * (65536 // len(self.line))
        while self.sent < self.limit:
            writer.write(chunk)
            await writer.drain()  # raises once the client has closed the connection
            self.sent += len(chunk)
        writer.write(self.tail)
        await reader.read()


FLOOD = 48 * 1024 * 1024
HELD_AT_MOST = 12 * 1024 * 1024
"""What the kernel's socket buffers take on loopback (about 4 MiB here), with room: more
sent means the client read it and held it."""


async def test_huge_multiline_reply_defers_the_message_and_is_not_held_in_memory(
        client: Client) -> None:
    """aiosmtplib's own cap on one reply (32 KiB) reaches the relay: the message is
    deferred and the connection closed, not read to its end."""
    servers = Servers()
    line = b"250-" + b"x" * 96 + b"\r\n"
    server = Flood(line, b"250 ok\r\n", FLOOD)
    upstream = client.upstream(await servers.raw(server))
    try:
        with pytest.raises(TemporaryFailure) as too_long:
            await upstream.deliver(client.message())
    finally:
        await servers.close()
    reply = too_long.value.reply
    assert "Response too long" in reply and "not an SMTP reply" in reply
    assert too_long.value.stage == "MAIL FROM" and len(reply) < 300
    assert server.sent < HELD_AT_MOST  # the connection was closed, not read to its end
    assert sessions_gauge(upstream) == 0


async def deliver_both(upstream: SmtpUpstream, first: Outgoing,
                       second: Outgoing) -> list[list[Outcome] | BaseException]:
    """Two deliveries at once, the first started first; each one's outcomes or failure."""
    one = asyncio.ensure_future(upstream.deliver(first))
    await asyncio.sleep(0)
    return list(await asyncio.gather(one, upstream.deliver(second), return_exceptions=True))


async def test_next_message_on_one_connection_waits_for_the_reply_to_the_final_dot(
        servers: Servers, client: Client) -> None:
    """With one connection, the second message's MAIL goes out only once the first has
    its reply: nothing arrives while that reply is held back."""
    server = Pipelined(hold_final=0.3)
    upstream = client.upstream(await servers.raw(server), pool_size=1, timeout=10)
    first, second = await deliver_both(upstream, client.message("a@example.com"),
                                       client.message("b@example.com"))
    assert not isinstance(first, BaseException) and delivered(first)
    assert not isinstance(second, BaseException) and delivered(second)
    assert server.early == [b""]
    assert server.messages == [BODY, BODY] and len(servers._writers) == 1


async def test_refused_final_dot_fails_its_message_alone_and_the_next_is_sent(
        servers: Servers, client: Client) -> None:
    server = Pipelined(final_replies=[b"452 4.3.1 Insufficient system storage"])
    upstream = client.upstream(await servers.raw(server), pool_size=1, timeout=10)
    first, second = await deliver_both(upstream, client.message("a@example.com"),
                                       client.message("b@example.com"))
    assert isinstance(first, TemporaryFailure) and first.code == 452
    assert first.stage == "DATA" and "Insufficient system storage" in first.reply
    assert not isinstance(second, BaseException) and delivered(second)
    assert server.messages == [BODY, BODY] and len(servers._writers) == 1


@pytest.mark.parametrize("final", [b"", b"421 4.3.2 Shutting down"],
                         ids=["no reply", "421 and close"])
async def test_connection_lost_after_a_final_dot_sends_the_next_message_on_a_new_one(
        servers: Servers, client: Client, final: bytes) -> None:
    """The first message's fate is unknown (no reply) or refused for now (421): it is
    deferred, and its connection closed. The next goes over a new connection."""
    server = Pipelined(final_replies=[final])
    upstream = client.upstream(await servers.raw(server), pool_size=1, timeout=1)
    first, second = await deliver_both(upstream, client.message("a@example.com"),
                                       client.message("b@example.com"))
    assert isinstance(first, TemporaryFailure) and first.stage == "DATA"
    assert not isinstance(second, BaseException) and delivered(second)
    assert server.messages == [BODY, BODY] and len(servers._writers) == 2
    assert upstream.metrics.upstream_sessions.labels("test")._value.get() == 1


async def test_sender_refused_fails_the_message_and_keeps_the_session(
        servers: Servers, client: Client) -> None:
    script = Script(mail_replies=["553 5.1.8 <notify@example.com>: Sender address rejected: "
                                  "Domain not found"])
    upstream = client.upstream(await servers.smtp(script))
    with pytest.raises(PermanentFailure, match="Sender address rejected") as refused:
        await upstream.deliver(client.message("a@example.com", "b@example.com"))
    assert refused.value.code == 553 and refused.value.stage == "MAIL FROM"
    assert script.rsets == 1 and script.messages == []
    assert delivered(await upstream.deliver(client.message("c@example.com")))
    assert script.connections == 1
    assert [m.rcpt_tos for m in script.messages] == [["c@example.com"]]


# --- 7. STARTTLS and certificates ---------------------------------------------------------


async def test_starttls_required_but_not_offered_fails_before_any_mail(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script), encryption="starttls")
    with pytest.raises(TemporaryFailure) as caught:
        await upstream.deliver(client.message())
    assert caught.value.stage == "STARTTLS"
    assert "does not offer STARTTLS" in caught.value.reply
    assert script.mails == [] and script.lines == [] and script.messages == []


async def test_starttls_with_certificate_from_ca_file_delivers_encrypted(
        servers: Servers, client: Client, server_tls: ssl.SSLContext, ca_file: Path) -> None:
    script = Script()
    port = await servers.smtp(script, tls_context=server_tls)
    upstream = client.upstream(port, encryption="starttls", ca_file=ca_file)
    assert delivered(await upstream.deliver(client.message()))
    assert script.encrypted == [True]
    assert [m.data for m in script.messages] == [BODY]


async def test_messages_at_once_over_one_starttls_connection_all_arrive_encrypted(
        servers: Servers, client: Client, server_tls: ssl.SSLContext, ca_file: Path) -> None:
    """Five deliveries at once with pool_size = 1: one connection, one STARTTLS, each
    message in turn through it."""
    script = Script()
    port = await servers.smtp(script, tls_context=server_tls)
    upstream = client.upstream(port, encryption="starttls", ca_file=ca_file, pool_size=1)
    messages = [client.message(f"r{n}@example.com") for n in range(5)]
    results = await asyncio.gather(*(upstream.deliver(m) for m in messages))
    assert all(delivered(r) for r in results)
    assert script.encrypted == [True] * 5 and script.connections == 1
    assert sorted(m.rcpt_tos[0] for m in script.messages) == [
        f"r{n}@example.com" for n in range(5)]


async def test_sessions_share_one_tls_context_made_again_when_the_ca_file_changes(
        servers: Servers, client: Client, ca_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a context reads the system trust store (tens of ms of CPU): two sessions
    share one. A CA file replaced on disk (a renewed CA) is used by the next session,
    without a reload."""
    made: list[ssl.SSLContext] = []
    real = network.tls_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(network, "tls_context", counted)
    renewed = trustme.CA(organization_name="renewed upstream CA")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    renewed.issue_cert("127.0.0.1").configure_cert(server_tls)
    script = Script()
    port = await servers.smtp(script, tls_context=server_tls)
    upstream = client.upstream(port, encryption="starttls", ca_file=ca_file, pool_size=2)
    with pytest.raises(TemporaryFailure, match="not trusted"):
        await upstream.deliver(client.message())
    assert len(made) == 1
    renewed.cert_pem.write_to_path(str(ca_file))
    results = await asyncio.gather(*(upstream.deliver(client.message(f"r{n}@example.com"))
                                     for n in range(4)))
    assert all(delivered(r) for r in results)
    assert script.connections == 3  # the untrusted one, then pool_size at once
    assert script.encrypted == [True] * 4
    assert len(made) == 2  # once for the old file, once for the renewed one


async def test_starttls_untrusted_certificate_fails_as_not_trusted(
        servers: Servers, client: Client, server_tls: ssl.SSLContext) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script, tls_context=server_tls),
                               encryption="starttls")
    with pytest.raises(TemporaryFailure) as caught:
        await upstream.deliver(client.message())
    assert "not trusted" in caught.value.reply
    assert "ca_file" in caught.value.reply
    assert script.mails == []


async def test_starttls_with_tls_verify_false_accepts_untrusted_certificate(
        servers: Servers, client: Client, server_tls: ssl.SSLContext) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script, tls_context=server_tls),
                               encryption="starttls", tls_verify=False)
    assert delivered(await upstream.deliver(client.message()))
    assert script.encrypted == [True]


async def test_implicit_tls_with_certificate_from_ca_file_delivers(
        servers: Servers, client: Client, server_tls: ssl.SSLContext, ca_file: Path) -> None:
    script = Script()
    port = await servers.smtp(script, implicit_tls=server_tls)
    upstream = client.upstream(port, encryption="tls", ca_file=ca_file)
    assert delivered(await upstream.deliver(client.message()))
    assert script.encrypted == [True]


async def test_implicit_tls_untrusted_certificate_fails_as_not_trusted(
        servers: Servers, client: Client, server_tls: ssl.SSLContext) -> None:
    script = Script()
    port = await servers.smtp(script, implicit_tls=server_tls)
    upstream = client.upstream(port, encryption="tls")
    with pytest.raises(TemporaryFailure) as caught:
        await upstream.deliver(client.message())
    assert "not trusted" in caught.value.reply
    assert script.mails == []


# --- 8. AUTH ------------------------------------------------------------------------------


def auth(method: str = "PLAIN", password: str = PASSWORD) -> dict[str, str]:
    return {"method": method, "username": "sys", "password": password}


@pytest.mark.parametrize("method", ["PLAIN", "LOGIN"])
async def test_auth_with_the_right_password_delivers(
        servers: Servers, client: Client, method: str) -> None:
    script = Script(password=PASSWORD)
    upstream = client.upstream(await servers.smtp(script), auth=auth(method))
    assert delivered(await upstream.deliver(client.message()))
    assert script.logins == ["sys"]
    assert auth_failures(upstream, method) in (None, 0)


async def test_auth_method_not_offered_names_what_the_server_offers(
        servers: Servers, client: Client) -> None:
    script = Script(password=PASSWORD)
    upstream = client.upstream(await servers.smtp(script), auth=auth("CRAM-MD5"))
    with pytest.raises(AuthenticationFailure) as caught:
        await upstream.deliver(client.message())
    assert "does not offer AUTH CRAM-MD5; it offers LOGIN, PLAIN" in caught.value.reply
    assert script.logins == [] and script.mails == []


async def test_wrong_password_535_is_an_authentication_failure_and_counted(
        servers: Servers, client: Client) -> None:
    script = Script(password="the-right-one")
    upstream = client.upstream(await servers.smtp(script), auth=auth())
    with pytest.raises(AuthenticationFailure) as caught:
        await upstream.deliver(client.message())
    assert caught.value.code == 535
    assert "535" in caught.value.reply and PASSWORD not in caught.value.reply
    assert auth_failures(upstream, "PLAIN") == 1
    assert script.mails == []
    assert upstream.not_before() < time.time()  # one failure does not pause yet


async def test_three_auth_failures_in_a_row_pause_the_server_without_connecting(
        servers: Servers, client: Client) -> None:
    script = Script(password="the-right-one")
    upstream = client.upstream(await servers.smtp(script), auth=auth())
    for _ in range(3):
        with pytest.raises(AuthenticationFailure):
            await upstream.deliver(client.message())
    assert auth_failures(upstream, "PLAIN") == 3
    assert upstream.not_before() > time.time() + 30
    with pytest.raises(RateLimited) as caught:
        await upstream.deliver(client.message())
    assert caught.value.retry_at == pytest.approx(upstream.not_before(), abs=1)
    assert "authentication failures" in caught.value.reply
    assert script.connections == 3
    assert PASSWORD not in caught.value.reply


# --- 9. pacing ----------------------------------------------------------------------------


async def test_rate_limit_holds_the_third_message_for_about_a_minute(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script), rate_limit="2/min")
    for _ in range(2):
        assert delivered(await upstream.deliver(client.message()))
    with pytest.raises(RateLimited) as caught:
        await upstream.deliver(client.message())
    assert caught.value.retry_at is not None
    assert 55 < caught.value.retry_at - time.time() <= 60.5
    assert upstream.not_before() == pytest.approx(caught.value.retry_at, abs=0.5)
    assert len(script.messages) == 2


async def test_rate_limit_counts_messages_still_in_flight(
        servers: Servers, client: Client) -> None:
    """Three messages at once through two connections, one allowed a minute: the limit
    counts a message when it is tried, not when its reply comes back."""
    script = Script()
    upstream = client.upstream(await servers.smtp(script), rate_limit="1/min", pool_size=2)
    results = await asyncio.gather(*(upstream.deliver(client.message()) for _ in range(3)),
                                   return_exceptions=True)
    assert sum(isinstance(r, RateLimited) for r in results) == 2
    assert sum(not isinstance(r, BaseException) and delivered(r) for r in results) == 1
    assert len(script.messages) == 1


async def test_daily_recipient_quota_holds_the_message_that_would_exceed_it(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script), max_recipients_per_day=3)
    assert delivered(await upstream.deliver(client.message("a@example.com", "b@example.com")))
    with pytest.raises(RateLimited) as caught:
        await upstream.deliver(client.message("c@example.com", "d@example.com"))
    assert caught.value.retry_at is not None
    assert caught.value.retry_at - time.time() == pytest.approx(86400, abs=5)
    assert len(script.messages) == 1


async def test_attempt_that_failed_as_a_whole_does_not_use_up_the_daily_quota(
        servers: Servers, client: Client) -> None:
    script = Script(mail_replies=["451 4.3.0 Temporary lookup failure"])
    upstream = client.upstream(await servers.smtp(script), max_recipients_per_day=1,
                               rate_limit="1/min")
    message = client.message("a@example.com")
    with pytest.raises(TemporaryFailure):
        await upstream.deliver(message)
    assert delivered(await upstream.deliver(message))  # the retry is not held
    with pytest.raises(RateLimited):
        await upstream.deliver(client.message("b@example.com"))


async def test_without_limits_nothing_is_remembered_per_message(
        servers: Servers, client: Client) -> None:
    """The pacing history grows only while a limit needs it (else: memory per message)."""
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    for _ in range(20):
        assert delivered(await upstream.deliver(client.message()))
    assert (len(upstream.pacing._sent), len(upstream.pacing._rcpts)) == (0, 0)
    limited = client.upstream(await servers.smtp(script), rate_limit="1000/s")
    for _ in range(3):
        assert delivered(await limited.deliver(client.message()))
    assert len(limited.pacing._sent) == 3


async def test_ordinary_4xx_does_not_slow_the_server_down(
        servers: Servers, client: Client) -> None:
    script = Script(rcpt_replies={"a@example.com": ["450 4.2.0 Mailbox busy"]})
    upstream = client.upstream(await servers.smtp(script))
    (outcome,) = await upstream.deliver(client.message())
    assert isinstance(outcome.failure, TemporaryFailure)
    assert upstream.not_before() < time.time()


async def test_too_many_connections_banner_slows_the_server_down(
        servers: Servers, client: Client) -> None:
    port = await servers.raw(banner(b"421 4.7.0 upstream.test Too many connections, "
                                    b"try again later"))
    upstream = client.upstream(port)
    with pytest.raises(TemporaryFailure) as caught:
        await upstream.deliver(client.message())
    assert caught.value.code == 421
    assert upstream.not_before() > time.time() + 20


async def test_too_many_connections_reply_to_mail_slows_the_server_down(
        servers: Servers, client: Client) -> None:
    script = Script(mail_replies=["421 4.7.0 Too many connections from 127.0.0.1"],
                    hang_up_after={"MAIL"})
    upstream = client.upstream(await servers.smtp(script))
    with pytest.raises(TemporaryFailure) as caught:
        await upstream.deliver(client.message())
    assert caught.value.code == 421
    assert upstream.not_before() > time.time() + 20


async def test_too_many_messages_at_rcpt_slows_the_server_down(
        servers: Servers, client: Client) -> None:
    script = Script(rcpt_replies={"a@example.com": ["450 4.7.0 too many messages, slow down"]})
    upstream = client.upstream(await servers.smtp(script))
    (outcome,) = await upstream.deliver(client.message())
    assert isinstance(outcome.failure, TemporaryFailure)
    assert upstream.not_before() > time.time() + 20
    with pytest.raises(RateLimited):
        await upstream.deliver(client.message())


# --- 10. ESMTP pass-through ---------------------------------------------------------------


async def test_smtputf8_and_utf8_recipient_sent_when_the_server_offers_it(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script, enable_SMTPUTF8=True))
    message = client.message("jürgen@example.com", mail_options=["SMTPUTF8"])
    assert delivered(await upstream.deliver(message))
    assert "SMTPUTF8" in script.mails[0][1]
    assert [r for r, _ in script.rcpts] == ["jürgen@example.com"]


async def test_utf8_recipient_without_smtputf8_fails_permanently_naming_it(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    with pytest.raises(PermanentFailure) as caught:
        await upstream.deliver(client.message("jürgen@example.com",
                                              mail_options=["SMTPUTF8"]))
    assert "SMTPUTF8" in caught.value.reply
    assert script.mails == []


@pytest.mark.parametrize("in_memory", [True, False])
async def test_smtputf8_message_without_smtputf8_server_depends_on_its_headers(
        servers: Servers, client: Client, in_memory: bool) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    utf8_header = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n"
    utf8_body_only = b"Subject: hello\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    refused = client.message(data=utf8_header, mail_options=["SMTPUTF8"], in_memory=in_memory)
    with pytest.raises(PermanentFailure) as caught:
        await upstream.deliver(refused)
    assert "UTF-8 headers" in caught.value.reply and script.mails == []
    sent = client.message(data=utf8_body_only, mail_options=["SMTPUTF8"], in_memory=in_memory)
    assert delivered(await upstream.deliver(sent))
    assert script.messages[-1].data.endswith(utf8_body_only.split(b"\r\n\r\n")[1])


async def test_8bit_body_goes_with_body_8bitmime_and_size_when_offered(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    assert delivered(await upstream.deliver(client.message(data=EIGHT_BIT)))
    options = script.mails[0][1]
    assert "BODY=8BITMIME" in options
    assert f"SIZE={len(EIGHT_BIT)}" in options
    assert [m.data for m in script.messages] == [EIGHT_BIT]


async def test_7bit_body_is_not_announced_as_8bitmime(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    assert delivered(await upstream.deliver(client.message()))
    assert not any(o.startswith("BODY=") for o in script.mails[0][1])


async def test_8bit_body_refused_by_server_without_8bitmime_fails_clearly(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script, decode_data=True))  # no 8BITMIME
    with pytest.raises(PermanentFailure) as caught:
        await upstream.deliver(client.message(data=EIGHT_BIT))
    assert "8BITMIME" in caught.value.reply
    assert not any(o.startswith("BODY=") for o in script.mails[0][1])
    assert script.messages == []


def dsn_message(client: Client) -> Outgoing:
    rcpt = Recipient("a@example.com",
                     options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@example.com"])
    return client.message(rcpt, mail_options=["RET=HDRS", "ENVID=x"])


async def test_dsn_parameters_sent_when_the_server_offers_dsn(
        servers: Servers, client: Client) -> None:
    script = Script(dsn=True)
    upstream = client.upstream(await servers.smtp(script))
    assert delivered(await upstream.deliver(dsn_message(client)))
    mail, rcpt = script.lines
    assert mail.startswith("MAIL FROM:<notify@example.com>")
    assert "RET=HDRS" in mail.split() and "ENVID=x" in mail.split()
    assert rcpt.split()[2:] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@example.com"]


async def test_dsn_parameters_dropped_with_a_log_line_when_not_offered(
        servers: Servers, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script))
    with caplog.at_level(logging.INFO, logger="relay.upstream"):
        assert delivered(await upstream.deliver(dsn_message(client)))
    assert not any(p in line for line in script.lines
                   for p in ("RET=", "ENVID=", "NOTIFY=", "ORCPT="))
    assert "does not offer DSN" in caplog.text


async def test_message_larger_than_advertised_size_fails_permanently_before_mail(
        servers: Servers, client: Client) -> None:
    script = Script()
    upstream = client.upstream(await servers.smtp(script, data_size_limit=64))
    with pytest.raises(PermanentFailure) as caught:
        await upstream.deliver(client.message())
    assert "SIZE" in caught.value.reply and str(len(BODY)) in caught.value.reply
    assert script.mails == [] and script.messages == []


# --- 11. check --connect -----------------------------------------------------------------


def stage_of(line: str) -> str:
    return line[:16].strip()


async def test_probe_prints_every_step_with_its_time_and_passes(
        servers: Servers, client: Client, server_tls: ssl.SSLContext, ca_file: Path) -> None:
    script = Script(password=PASSWORD)
    port = await servers.smtp(script, tls_context=server_tls, auth_require_tls=True)
    settings = client.settings(port, encryption="starttls", ca_file=ca_file, auth=auth())
    lines: list[str] = []
    assert await probe("test", settings, "relay.test", lines.append) is True
    assert [stage_of(line) for line in lines] == [
        "connect", "EHLO", "STARTTLS", "certificate", "EHLO", "AUTH PLAIN", "QUIT"]
    assert all(re.search(r"\d+\.\d ms  \S", line) for line in lines), lines
    assert "220 " in lines[0] and "235 " in lines[5]
    assert "issuer" in lines[3] and "upstream test CA" in lines[3]
    assert script.logins == ["sys"]
    assert not any(PASSWORD in line for line in lines)


async def test_probe_with_wrong_password_fails_and_never_prints_it(
        servers: Servers, client: Client) -> None:
    script = Script(password="the-right-one")
    settings = client.settings(await servers.smtp(script), auth=auth())
    lines: list[str] = []
    assert await probe("test", settings, "relay.test", lines.append) is False
    assert [stage_of(line) for line in lines] == ["connect", "EHLO", "AUTH PLAIN"]
    assert "FAILED" in lines[-1] and "535" in lines[-1]
    assert not any(PASSWORD in line for line in lines)


async def test_probe_of_a_server_that_is_down_fails_at_connect(client: Client) -> None:
    lines: list[str] = []
    assert await probe("test", client.settings(free_port()), "relay.test", lines.append) is False
    assert len(lines) == 1 and stage_of(lines[0]) == "connect" and "FAILED" in lines[0]


# --- 12. classify and explain -------------------------------------------------------------


def classified(error: BaseException, stage: str = "RCPT TO") -> DeliveryFailure:
    return classify(error, server="test (mx:25)", stage=stage, timeout=10)


def test_explain_adds_the_exchange_online_basic_auth_hint_to_5_7_30() -> None:
    reply = "550 5.7.30 Basic authentication is not supported for Client Submission."
    text = explain(reply)
    assert text.startswith(reply) and "OAuth" in text and "basic authentication" in text


def test_explain_adds_the_send_as_hint_to_sendasdenied() -> None:
    reply = ("554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException."
             "MapiExceptionSendAsDenied; Failed to process message")
    text = explain(reply)
    assert text.startswith(reply) and "system_account.address" in text


def test_explain_leaves_unknown_replies_alone() -> None:
    assert explain("250 2.0.0 OK") == "250 2.0.0 OK"


def test_classify_5_7_30_at_mail_keeps_the_reply_with_the_hint() -> None:
    error = aiosmtplib.SMTPSenderRefused(
        550, "5.7.30 Basic authentication is not supported for Client Submission.", SENDER)
    failure = classified(error, "MAIL FROM")
    assert failure.code == 550 and failure.stage == "MAIL FROM"
    assert "550 5.7.30 Basic authentication is not supported" in failure.reply
    assert "OAuth" in failure.reply


@pytest.mark.parametrize(("code", "kind"), [(421, TemporaryFailure), (450, TemporaryFailure),
                                            (452, TemporaryFailure), (550, PermanentFailure),
                                            (554, PermanentFailure)])
def test_classify_4xx_is_temporary_and_5xx_permanent_keeping_the_reply(
        code: int, kind: type[DeliveryFailure]) -> None:
    failure = classified(aiosmtplib.SMTPRecipientRefused(code, "x.y.z the reply", "a@b"))
    assert type(failure) is kind and failure.code == code
    assert f"{code} x.y.z the reply" in failure.reply and failure.stage == "RCPT TO"


def test_classify_535_is_an_authentication_failure() -> None:
    failure = classified(aiosmtplib.SMTPAuthenticationError(
        535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"),
        "AUTH LOGIN")
    assert isinstance(failure, AuthenticationFailure) and failure.code == 535
    assert "SmtpClientAuthenticationDisabled" in failure.reply  # the 5.7.139 hint


def test_classify_sasl_error_is_an_authentication_failure() -> None:
    failure = classified(SaslError("the server's rspauth is wrong"), "AUTH DIGEST-MD5")
    assert isinstance(failure, AuthenticationFailure) and "rspauth" in failure.reply


def test_classify_read_timeout_names_the_stage_and_the_seconds() -> None:
    failure = classified(aiosmtplib.SMTPReadTimeoutError("Timed out"), "DATA")
    assert isinstance(failure, UpstreamTimeout)
    assert failure.reply == "timeout after 10 s waiting for the reply to DATA from test (mx:25)"


def test_classify_connect_timeout_says_connecting() -> None:
    failure = classified(aiosmtplib.SMTPConnectTimeoutError("Timed out connecting"), "connect")
    assert isinstance(failure, UpstreamTimeout)
    assert failure.reply == "timeout after 10 s connecting to test (mx:25)"


def test_classify_untrusted_certificate_says_not_trusted() -> None:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED]")
    error.verify_message = "self-signed certificate in certificate chain"
    failure = classified(error, "STARTTLS")
    assert type(failure) is TemporaryFailure
    assert "not trusted: self-signed certificate in certificate chain" in failure.reply


def test_classify_other_tls_error_is_temporary() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    failure = classified(error, "STARTTLS")
    assert type(failure) is TemporaryFailure and "WRONG_VERSION_NUMBER" in failure.reply


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "Connection refused"),
                                   aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"),
                                   aiosmtplib.SMTPConnectError("Error connecting to mx on "
                                                               "port 25: refused")])
def test_classify_lost_or_refused_connection_is_unreachable(error: BaseException) -> None:
    failure = classified(error, "connect")
    assert isinstance(failure, UpstreamUnreachable) and "(during connect)" in failure.reply
    assert "Error connecting to" not in failure.reply


def test_classify_passes_our_own_failures_through() -> None:
    original = PermanentFailure("already classified", code=552)
    assert classified(original) is original


@pytest.mark.parametrize(("reply", "slow"), [
    ("421 4.7.0 Too many connections", True),
    ("450 4.7.0 too many messages, slow down", True),
    ("451 4.7.500 Server busy. Please try again later", True),
    ("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", True),
    ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", True),
    ("450 4.2.0 Mailbox busy", False),
    ("550 5.7.0 too many recipients", False),
])
def test_slow_down_requested_only_for_4xx_too_many_or_a_quota(reply: str, slow: bool) -> None:
    assert slow_down_requested(reply) is slow


QUOTA = ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed "
         "to process message due to a permanent exception")


async def test_exchange_quota_after_data_defers_the_message_and_pauses_the_server(
        servers: Servers, client: Client) -> None:
    """Exchange Online's sending quota answers 554 after the final dot: the mailbox may not
    send now, the message is fine. It waits in the queue (not a dead letter) and nothing
    more is tried until the pause ends."""
    script = Script(data_replies=[QUOTA])
    upstream = client.upstream(await servers.smtp(script))
    with pytest.raises(TemporaryFailure) as caught:
        await upstream.deliver(client.message())
    assert caught.value.code == 554 and "sending quota" in caught.value.reply
    assert upstream.not_before() > time.time() + 20
    with pytest.raises(RateLimited):
        await upstream.deliver(client.message())
