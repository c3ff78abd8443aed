"""The listener over real sockets: what it accepts, what it refuses, and with which reply."""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import socket
from typing import AnyStr

import pytest

from relay.app import Relay
from relay.listener.server import RelaySMTP
from tests.support import RawSMTP, RelayFactory, listener_port, outbox_files, wait_until

MESSAGE = (b"From: Billing App <billing@apps.example.com>\r\n"
           b"To: user@example.com\r\n"
           b"Subject: Invoice ready\r\n"
           b"\r\n"
           b"Your invoice is ready.\r\n")


async def ehlo(relay: Relay) -> RawSMTP:
    client = await RawSMTP.connect(listener_port(relay))
    assert client.greeting.startswith("220 ")
    assert (await client.cmd("EHLO app.example.com")).startswith("250")
    return client


def sent_files(relay: Relay, count: int = 1) -> list[bytes]:
    files = outbox_files(relay.settings.state_dir)
    assert len(files) == count, files
    return [f.read_bytes() for f in files]


async def test_smtplib_message_reaches_outbox_with_system_sender(relay: Relay) -> None:
    port = listener_port(relay)

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port) as client:
            return client.sendmail("billing@apps.example.com", ["user@example.com"], MESSAGE)

    assert await asyncio.to_thread(send) == {}
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    (data,) = sent_files(relay)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"Return-Path: <relay@localhost>\r\nDelivered-To: user@example.com\r\n")
    assert b"\r\nFrom: Billing App <relay@localhost>\r\n" in head
    assert b"\r\nReply-To: Billing App <billing@apps.example.com>\r\n" in head
    assert b"Received: " in head and b"Message-ID: <" in head and b"\r\nDate: " in head
    assert body == b"Your invoice is ready.\r\n"
    assert relay.metrics.messages_received._value.get() == 1


async def test_reply_250_names_the_queue_id(relay: Relay) -> None:
    client = await ehlo(relay)
    reply = await client.transaction(MESSAGE + b".\r\n")
    assert reply.startswith("250 2.0.0 OK queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    assert queue_id.encode() in outbox_files(relay.settings.state_dir)[0].name.encode()
    await client.close()


async def test_client_outside_allowed_networks_is_refused_at_connect(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"allowed_networks": ["192.0.2.0/24"]})
    client = await RawSMTP.connect(listener_port(relay))
    assert client.greeting.startswith("554 5.7.1 ")
    assert "listener.allowed_networks" in client.greeting
    assert await client.reply() == ""  # and the connection is closed
    await client.close()


async def test_a_client_that_closes_before_the_greeting_frees_its_connection_slot(
        relay_factory: RelayFactory) -> None:
    """A TCP health check connects and closes at once; each must give its slot back."""
    relay = await relay_factory(listener={"max_connections": 2})
    for _ in range(5):  # connected and closed before the relay's loop has even accepted
        socket.create_connection(("127.0.0.1", listener_port(relay))).close()
    deadline = asyncio.get_running_loop().time() + 10  # idle_timeout is 300 s
    while True:  # the first attempts may come before the relay has seen those closes
        client = await RawSMTP.connect(listener_port(relay))
        await client.close()
        if client.greeting.startswith("220 "):
            break
        assert asyncio.get_running_loop().time() < deadline, client.greeting
        await asyncio.sleep(0.05)
    await wait_until(lambda: not relay.listener._sessions)  # type: ignore[union-attr]


async def test_a_reply_that_echoes_bytes_that_are_not_utf8_is_sent_not_an_exception(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    client = await RawSMTP.connect(listener_port(relay))
    await client.cmd("EHLO app.example.com")
    reply = await client.cmd(b"VRFY @caf\xe9\xff")
    assert reply.startswith("502 ") and "caf" in reply
    assert (await client.cmd("NOOP")).startswith("250 ")
    await client.close()
    assert "UnicodeEncodeError" not in caplog.text


async def test_no_auth_is_offered(relay: Relay) -> None:
    client = await RawSMTP.connect(listener_port(relay))
    features = await client.cmd("EHLO app.example.com")
    assert "AUTH" not in features
    assert "SIZE 26214400" in features and "8BITMIME" in features and "SMTPUTF8" in features
    assert (await client.cmd("AUTH PLAIN AGFiYwBkZWY=")).startswith("502 5.5.1")
    await client.close()


async def test_ehlo_reply_lines_go_out_in_one_write(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []  # aiosmtpd's push() is one write to the socket
    push = RelaySMTP.push

    async def counted(self: RelaySMTP, status: AnyStr) -> None:
        writes.append(str(status))
        await push(self, status)

    monkeypatch.setattr(RelaySMTP, "push", counted)
    client = await RawSMTP.connect(listener_port(relay))
    features = await client.cmd("EHLO app.example.com")
    hostname = relay.settings.listener.hostname or socket.gethostname()
    assert features.split("\n") == [f"250-{hostname}", "250-SIZE 26214400", "250-8BITMIME",
                                     "250-SMTPUTF8", "250-DSN", "250-ENHANCEDSTATUSCODES",
                                     "250 HELP"]
    assert len(writes) == 2  # the greeting, then the whole EHLO reply
    await client.close()


ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
COMMANDS = [
    "MAIL FROM:<app@example.com>",  # before EHLO
    "EHLO",  # no name
    "HELO",
    "EHLO app.example.com",
    "NOOP", "NOOP extra", "HELP", "HELP MAIL", "HELP RCPT", "HELP AUTH", "HELP FOO",
    "VRFY", "VRFY <user@example.com>", "VRFY a b", "EXPN list", "FOO bar", "AUTH PLAIN",
    "AUTH", "STARTTLS", "RSET", "RSET now", "DATA", "RCPT TO:<user@example.com>", "MAIL",
    "MAIL FROM:", "MAIL FROM:<not an address>", "MAIL FROM:<app@example.com> BODY=9BIT",
    "MAIL FROM:<app@example.com> SIZE=999999999999", "MAIL FROM:<app@example.com> FOO=bar",
    "MAIL FROM:<app@example.com> RET=NONSENSE", "MAIL FROM:<app@example.com> SMTPUTF8=x",
    f"MAIL FROM:<{'a' * 65}@example.com>",
    "MAIL FROM:<app@example.com>", "MAIL FROM:<app@example.com>", "RCPT",
    "RCPT TO:", "RCPT TO:<no-at-sign>", "RCPT TO:<user@example.com> NOTIFY=SOMETIMES",
    "RCPT TO:<user@example.com> FOO=bar", f"RCPT TO:<{'a' * 65}@example.com>",
    "RCPT TO:<user@example.com>", "DATA now", "x" * 70000, "HELO app.example.com",
    "EHLO app.example.com", "QUIT now", "QUIT",
]


async def test_every_reply_carries_an_enhanced_status_code(relay: Relay) -> None:
    """RFC 2034: every 2xx, 4xx and 5xx line but the greeting's and EHLO's or HELO's 250."""
    client = await RawSMTP.connect(listener_port(relay))
    seen: list[tuple[str, str]] = []
    for command in COMMANDS:
        reply = await client.cmd(command)
        seen.append((command[:40], reply))
    await client.close()
    for command, reply in seen:
        assert reply, command
        if command.startswith(("EHLO ", "HELO ")) and reply.startswith("250"):
            continue
        for line in reply.split("\n"):
            assert ENHANCED.match(line), (command, reply)
    replies: dict[str, str] = {}
    for command, reply in seen:
        replies.setdefault(command, reply)  # the first time each was sent
    assert replies["x" * 40].startswith("500 5.5.2")
    assert replies["RCPT TO:<user@example.com>"].startswith("503 5.5.1")
    assert replies["VRFY a b"].startswith(("501 5.5.4", "502 5.5.1", "252 2."))


async def test_help_does_not_list_auth_which_is_not_offered(relay: Relay) -> None:
    client = await ehlo(relay)
    commands = await client.cmd("HELP")
    assert commands.startswith("250 2.0.0 Supported commands:") and "MAIL" in commands
    assert "AUTH" not in commands
    assert (await client.cmd("HELP AUTH")).startswith("501 5.5.4")
    await client.close()


@pytest.mark.parametrize("postmaster", ["postmaster", "Postmaster", "POSTMASTER"])
async def test_rcpt_to_postmaster_without_a_domain_is_accepted(
        relay_factory: RelayFactory, postmaster: str) -> None:
    relay = await relay_factory(queue={"notify": "ops@example.com"})
    client = await ehlo(relay)
    reply = await client.transaction(MESSAGE + b".\r\n", rcpts=(postmaster,))
    assert reply.startswith("250"), reply
    await client.close()
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    assert b"ops@example.com" in sent_files(relay)[0]


@pytest.mark.parametrize(("address", "fits"), [
    ("a" * 64 + "@example.com", True),
    ("a" * 65 + "@example.com", False),
    ("user@" + ".".join(["d" * 63] * 4), True),  # 255 octets
    ("user@" + ".".join(["d" * 63] * 4) + "x", False),
    ("ü" * 32 + "@example.com", True),  # 64 octets in UTF-8
    ("ü" * 33 + "@example.com", False),
])
async def test_local_part_over_64_or_domain_over_255_octets_gets_553(
        relay: Relay, address: str, fits: bool) -> None:
    client = await ehlo(relay)
    sender = await client.cmd(f"MAIL FROM:<{address}> SMTPUTF8")
    assert sender.startswith("250" if fits else "553 5.1.7"), sender
    if not fits:
        assert "octets" in sender
        assert (await client.cmd("MAIL FROM:<app@example.com> SMTPUTF8")).startswith("250")
    rcpt = await client.cmd(f"RCPT TO:<{address}>")
    assert rcpt.startswith("250" if fits else "553 5.1.3"), rcpt
    await client.close()


@pytest.mark.parametrize(("command", "expected"), [
    ("FOO bar", "500"),
    ("MAIL", "501"),
    ("MAIL FROM:<app@example.com> BODY=9BIT", "501"),
    ("RCPT TO:<user@example.com>", "503 5.5.1"),
    ("DATA", "503"),
    ("MAIL FROM:<not an address>", "553"),
])
async def test_malformed_commands_get_an_error_and_the_session_goes_on(
        relay: Relay, command: str, expected: str) -> None:
    client = await ehlo(relay)
    assert (await client.cmd(command)).startswith(expected)
    assert (await client.cmd("NOOP")).startswith("250")
    await client.close()


@pytest.mark.parametrize("rcpt", ["<no-at-sign>", "<user@>", "<a b@example.com>"])
async def test_invalid_recipient_is_refused_with_the_reason(relay: Relay, rcpt: str) -> None:
    client = await ehlo(relay)
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    reply = await client.cmd(f"RCPT TO:{rcpt}")
    assert reply.startswith(("553", "501")), reply
    await client.close()


async def test_null_sender_is_accepted_and_replaced(relay: Relay) -> None:
    client = await ehlo(relay)
    reply = await client.transaction(MESSAGE + b".\r\n", sender="")
    assert reply.startswith("250"), reply
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    assert sent_files(relay)[0].startswith(b"Return-Path: <relay@localhost>")
    await client.close()


async def test_too_many_recipients_get_452(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"max_recipients": 2})
    client = await ehlo(relay)
    await client.cmd("MAIL FROM:<app@example.com>")
    assert (await client.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<c@example.com>")).startswith("452 4.5.3")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(MESSAGE + b".\r\n")
    assert (await client.reply()).startswith("250")
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    assert sent_files(relay)[0].count(b"Delivered-To:") == 2
    await client.close()


async def test_declared_size_over_the_limit_is_refused_at_mail(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"max_message_size": 10_000})
    client = await ehlo(relay)
    reply = await client.cmd("MAIL FROM:<app@example.com> SIZE=10001")
    assert reply.startswith("552 5.3.4") and "10000" in reply
    assert (await client.cmd("MAIL FROM:<app@example.com> SIZE=9000")).startswith("250")
    await client.close()


async def test_actual_size_over_the_limit_is_refused_after_data_and_nothing_is_queued(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"max_message_size": 10_000})
    client = await ehlo(relay)
    body = MESSAGE + (b"x" * 70 + b"\r\n") * 200 + b".\r\n"
    reply = await client.transaction(body)
    assert reply.startswith("552 5.3.4"), reply
    assert relay.spool.ids("queue") == [] and outbox_files(relay.settings.state_dir) == []
    # the session is still usable for a message that fits
    assert (await client.transaction(MESSAGE + b".\r\n")).startswith("250")
    await client.close()


async def test_a_message_over_the_limit_gets_552_and_leaves_nothing_in_incoming(
        relay_factory: RelayFactory) -> None:
    """Large enough that part of it was written out before the limit was passed."""
    relay = await relay_factory(listener={"max_message_size": 1 << 20})
    client = await ehlo(relay)
    body = MESSAGE + (b"z" * 998 + b"\r\n") * 2100 + b".\r\n"  # about 2 MiB
    reply = await client.transaction(body)
    assert reply.startswith("552 5.3.4"), reply
    await wait_until(lambda: os.listdir(relay.spool.root / "incoming") == [])
    assert relay.spool.ids("queue") == []
    assert (await client.cmd("NOOP")).startswith("250")
    await client.close()


async def test_data_is_written_into_the_spool_as_it_arrives_and_an_abort_removes_it(
        relay: Relay) -> None:
    """A client that sends part of a large message and hangs up: what it sent was on
    disk, not in the relay's memory, and nothing of it stays behind."""
    client = await ehlo(relay)
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<user@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(MESSAGE + (b"w" * 998 + b"\r\n") * 3000)  # about 3 MiB, no end
    incoming = relay.spool.root / "incoming"

    def written() -> int:
        return sum(entry.stat().st_size for entry in incoming.iterdir())

    await wait_until(lambda: written() >= 2 << 20)  # written while the client still sends
    await client.close()
    await wait_until(lambda: os.listdir(incoming) == [])
    assert relay.spool.ids("queue") == []
    again = await ehlo(relay)  # and the listener serves on
    await again.close()


async def test_the_subject_kept_for_logs_comes_from_the_head_and_is_cut_short(
        relay_factory: RelayFactory) -> None:
    """A Subject of 320 KB of encoded words: what the envelope keeps (for the log and
    the status page) is read from the message's first 64 KiB and cut to 200 characters;
    the message itself is kept whole."""
    relay = await relay_factory(system_account={"active": False})
    client = await ehlo(relay)
    head = b"Subject: " + b"=?utf-8?q?abc?= " * 20_000 + b"\r\n"
    reply = await client.transaction(head + b"\r\nbody\r\n.\r\n")
    assert reply.startswith("250"), reply
    queue_id = reply.rsplit(" ", 1)[1]
    env = relay.spool.read(queue_id, "queue")
    assert env.subject is not None and env.subject.startswith("abc")
    assert len(env.subject) == 200
    stored = relay.spool.read_message(queue_id, "queue")
    assert stored == head + b"\r\nbody\r\n" and env.size == len(stored)
    await client.close()


@pytest.mark.parametrize(("greeting", "mail_params", "protocol"), [
    ("HELO", "", "SMTP"), ("EHLO", "", "ESMTP"), ("EHLO", " SMTPUTF8", "UTF8SMTP")])
async def test_intake_keeps_the_clients_bytes_and_what_the_received_line_needs(
        relay_factory: RelayFactory, greeting: str, mail_params: str, protocol: str) -> None:
    """The spool holds the message as the client sent it (dot-stuffing undone): the
    rewrite for the account as it is when the message is sent happens then."""
    relay = await relay_factory(system_account={"active": False})
    client = await RawSMTP.connect(listener_port(relay))
    assert (await client.cmd(f"{greeting} app.example.com")).startswith("250")
    reply = await client.transaction(MESSAGE + b"..dotted\r\n.\r\n", mail_params=mail_params)
    assert reply.startswith("250"), reply
    queue_id = reply.rsplit(" ", 1)[1]
    stored = relay.spool.read_message(queue_id, "queue")
    assert stored == MESSAGE + b".dotted\r\n"
    env = relay.spool.read(queue_id, "queue")
    assert env.as_received and env.helo == "app.example.com" and env.protocol == protocol
    assert env.client == "127.0.0.1" and env.size == len(stored)
    assert env.subject == "Invoice ready" and env.received_at > 0
    await client.close()


async def test_max_connections_gives_421_to_the_next_client(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"max_connections": 2})
    first = await RawSMTP.connect(listener_port(relay))
    second = await RawSMTP.connect(listener_port(relay))
    third = await RawSMTP.connect(listener_port(relay))
    assert first.greeting.startswith("220") and second.greeting.startswith("220")
    assert third.greeting.startswith("421 4.7.0")
    await first.close()
    await wait_until(lambda: len(relay.listener._sessions) == 1)  # type: ignore[union-attr]
    fourth = await RawSMTP.connect(listener_port(relay))
    assert fourth.greeting.startswith("220")
    for c in (second, third, fourth):
        await c.close()


async def test_listen_queue_holds_a_burst_of_max_connections_clients(
        relay_factory: RelayFactory) -> None:
    import subprocess

    relay = await relay_factory(listener={"max_connections": 300})
    shown = await asyncio.to_thread(
        subprocess.run, ["ss", "-ltnH", f"sport = :{listener_port(relay)}"],
        capture_output=True, text=True, check=True)
    listing = shown.stdout.split()
    assert listing[0] == "LISTEN" and listing[2] == "300"  # Send-Q of a listener: its backlog


@pytest.mark.parametrize("smuggle", [b"\n.\r\n", b"\r.\n", b"\n.\n", b"\r\n.\r", b"\r.\r\n"])
async def test_smtp_smuggling_does_not_end_the_message(relay: Relay, smuggle: bytes) -> None:
    client = await ehlo(relay)
    smuggled = (b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                b"From: ceo@example.com\r\n\r\nsmuggled\r\n")
    body = MESSAGE + b"line before" + smuggle + smuggled + b".\r\n"
    reply = await client.transaction(body)
    assert reply.startswith("250"), reply
    assert (await client.cmd("NOOP")).startswith("250")  # nothing left over in the stream
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    await asyncio.sleep(0.2)
    (data,) = sent_files(relay)
    # RFC 5321 4.5.2: a line that starts with "." loses that dot (the client should have doubled it)
    kept = smuggle.replace(b"\r\n.", b"\r\n")
    assert data.endswith(b"line before" + kept + smuggled)
    assert data.count(b"Return-Path:") == 1
    await client.close()


@pytest.mark.parametrize(("name", "body"), [
    ("bare LF", b"line one\nline two\n"),
    ("NUL bytes", b"before\x00after\r\n"),
    ("8-bit without 8BITMIME", "Grüße aus Köln\r\n".encode()),
    ("latin-1 8-bit", "café\r\n".encode("latin-1")),
])
async def test_unusual_bytes_are_kept_exactly(relay: Relay, name: str, body: bytes) -> None:
    client = await ehlo(relay)
    message = b"Subject: bytes\r\n\r\n" + body
    suffix = b"" if message.endswith(b"\r\n") else b"\r\n"
    assert (await client.transaction(message + suffix + b".\r\n")).startswith("250")
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    (data,) = sent_files(relay)
    assert data.endswith(b"\r\n\r\n" + body + suffix), name
    await client.close()


async def test_smtputf8_and_8bitmime_are_accepted_and_kept_for_the_upstream(relay: Relay) -> None:
    client = await ehlo(relay)
    message = "From: Jürgen <jürgen@example.com>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    reply = await client.transaction(message + b".\r\n", sender="jürgen@example.com",
                                     rcpts=("empfänger@example.com",),
                                     mail_params=" SMTPUTF8 BODY=8BITMIME")
    assert reply.startswith("250"), reply
    queue_id = reply.rsplit(" ", 1)[1]
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    (data,) = sent_files(relay)
    assert "Delivered-To: empfänger@example.com".encode() in data
    assert "From: Jürgen <relay@localhost>".encode() in data
    assert queue_id in outbox_files(relay.settings.state_dir)[0].name
    await client.close()


async def test_smtputf8_options_are_recorded_in_the_envelope(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory(system_account={"active": False})
    client = await ehlo(relay)
    reply = await client.transaction(b"Subject: x\r\n\r\nx\r\n.\r\n", sender="jürgen@example.com",
                                     mail_params=" SMTPUTF8 BODY=8BITMIME")
    queue_id = reply.rsplit(" ", 1)[1]
    env = relay.spool.read(queue_id, "queue")
    assert set(env.mail_options) == {"SMTPUTF8", "BODY=8BITMIME"}
    assert env.sender == "jürgen@example.com"
    await client.close()


async def test_spool_write_failure_gives_451_and_leaves_nothing(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    incoming = relay.spool.root / "incoming"
    aside = incoming.with_name("incoming.aside")
    incoming.rename(aside)
    incoming.write_bytes(b"")  # a file: the spool writer cannot make the message's entry
    try:
        client = await ehlo(relay)
        reply = await client.transaction(MESSAGE + b".\r\n")
        assert reply.startswith("451 4.3.0"), reply
        await client.close()
    finally:
        incoming.unlink()
        aside.rename(incoming)
    assert os.listdir(incoming) == [] and relay.spool.ids("queue") == []
    assert relay.metrics.messages_rejected.labels("spool")._value.get() == 1
    assert "Not a directory" in caplog.text  # the cause, for the operator


async def test_idle_client_is_disconnected(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"idle_timeout": 10})
    relay.listener.settings = relay.settings  # type: ignore[union-attr]
    client = await RawSMTP.connect(listener_port(relay))
    # aiosmtpd's idle timer: the server closes the connection after the configured idle time
    protocol = next(iter(relay.listener._sessions))  # type: ignore[union-attr]
    protocol._timeout_duration = 0.2
    protocol._reset_timeout()
    assert await client.reply(wait=5) == ""
    await client.close()


async def test_each_command_starts_the_idle_time_again(relay_factory: RelayFactory) -> None:
    """The idle timer is not renewed per command but waits out the rest when it fires:
    a client that keeps talking stays, one that stops is disconnected."""
    relay = await relay_factory(listener={"idle_timeout": 10})
    client = await RawSMTP.connect(listener_port(relay))
    protocol = next(iter(relay.listener._sessions))  # type: ignore[union-attr]
    protocol._timeout_duration = 0.3
    protocol._reset_timeout()
    for _ in range(5):  # 0.75 s in all, each command within 0.3 s of the one before
        await asyncio.sleep(0.15)
        assert (await client.cmd("NOOP")).startswith("250")
    assert await client.reply(wait=5) == ""  # then silent: closed
    await client.close()


async def test_dsn_parameters_are_kept_with_their_case_per_recipient(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory(system_account={"active": False})
    client = await RawSMTP.connect(listener_port(relay))
    assert "250-DSN" in await client.cmd("EHLO app.example.com")
    reply = await client.cmd("MAIL FROM:<app@example.com> RET=HDRS ENVID=Abc+2Bx")
    assert reply.startswith("250")
    assert (await client.cmd("RCPT TO:<a@example.com> NOTIFY=SUCCESS,FAILURE "
                             "ORCPT=rfc822;A@Example.com")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n")
    queue_id = (await client.reply()).rsplit(" ", 1)[1]
    env = relay.spool.read(queue_id, "queue")
    assert env.mail_options == ["RET=HDRS", "ENVID=Abc+2Bx"]
    assert [r.options for r in env.recipients] == [
        ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A@Example.com"], []]
    await client.close()


@pytest.mark.parametrize("command", ["MAIL FROM:<app@example.com> RET=ALL",
                                     "MAIL FROM:<app@example.com> ENVID=" + "x" * 101])
async def test_invalid_dsn_parameters_are_refused(relay: Relay, command: str) -> None:
    client = await ehlo(relay)
    assert (await client.cmd(command)).startswith("501 5.5.4")
    await client.close()


async def test_long_lines_are_accepted_within_the_message_size(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory(listener={"max_message_size": 100_000})
    client = await ehlo(relay)
    long_line = b"<p>" + b"y" * 70_000 + b"</p>"
    assert (await client.transaction(b"Subject: html\r\n\r\n" + long_line + b"\r\n.\r\n")
            ).startswith("250")
    huge = await client.transaction(b"Subject: html\r\n\r\n" + b"z" * 100_001 + b"\r\n.\r\n")
    assert huge.startswith("552 5.3.4")
    await wait_until(lambda: len(outbox_files(relay.settings.state_dir)) == 1)
    assert sent_files(relay)[0].endswith(long_line + b"\r\n")
    await client.close()


async def test_non_utf8_addresses_are_refused(relay: Relay) -> None:
    client = await ehlo(relay)
    assert (await client.cmd(b"MAIL FROM:<\xff\xfe@example.com>")).startswith("553 5.6.7")
    assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await client.cmd(b"RCPT TO:<b\xc3@example.com>")).startswith("553 5.6.7")
    await client.close()


async def test_stop_refuses_new_clients_and_lets_a_transaction_in_flight_finish(
        relay_factory: RelayFactory) -> None:
    relay = await relay_factory()
    port = listener_port(relay)
    client = await ehlo(relay)
    idle = await ehlo(relay)
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<user@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(b"Subject: in flight\r\n\r\npart one\r\n")
    stopping = asyncio.create_task(relay.stop(grace=5))
    await asyncio.sleep(0.2)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    assert (await idle.reply()).startswith("421 4.3.2")  # idle sessions are told and closed
    await client.send(b"part two\r\n.\r\n")
    assert (await client.reply()).startswith("250")
    await stopping
    delivered = [p.read_bytes() for p in outbox_files(relay.settings.state_dir)]
    queued = relay.spool.ids("queue")
    assert len(delivered) + len(queued) == 1
    await client.close()
    await idle.close()


def test_plain_address_shortcut_agrees_with_aiosmtpds_parser() -> None:
    import random
    from email._header_value_parser import get_angle_addr

    from relay.listener.server import plain_angle_addr

    chars = ["a", "B", "0", "x", "y", ".", "-", "+", "_", "'", "ü", '"', "(", ")", " ", "[", "]",
             ":", ",", "\\", "@"]
    tails = ["", " SIZE=10", "  NOTIFY=NEVER ORCPT=rfc822;a@b", "\tX", "(c)", " (c) SIZE=1", ">"]
    rng = random.Random(5)

    def word() -> str:
        return "".join(rng.choice(chars[:5] * 6 + chars) for _ in range(rng.randint(1, 6)))
    samples = ["<app@example.com>", " <a.b+c@mail-1.example.com>  SIZE=1024 BODY=8BITMIME",
               "<a..b@c>", "<.a@c>", "<a.@c>", '<"a b"@c>', "<a@[127.0.0.1]>", "<@r:a@b>",
               "<a@b> (comment) SIZE=1", "<a@b>(c)", "<a@-b.c>", "<>", "<a@b", "<ü@b>"]
    samples += [f"{rng.choice(['', ' ', chr(9)])}<{word()}@{word()}>{rng.choice(tails)}"
                for _ in range(20_000)]
    shortcut = 0
    for arg in samples:
        plain = plain_angle_addr(arg)
        if plain is None:
            continue
        shortcut += 1
        parsed, rest = get_angle_addr(arg)
        assert plain == (parsed.addr_spec, rest), arg
    assert shortcut > 2000  # the comparison covered many addresses, not only the fixed ones


async def test_shortened_dir_gives_aiosmtpd_the_same_commands_and_hooks(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.listener.server as listener_module
    from relay.listener.server import IntakeHandler, RelaySMTP

    class FullDir(RelaySMTP):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    class FullHandler(IntakeHandler):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    listener = relay.listener
    assert listener is not None
    fast = listener._protocol()
    monkeypatch.setattr(listener, "handler", FullHandler(listener))
    monkeypatch.setattr(listener_module, "RelaySMTP", FullDir)
    full = listener._protocol()
    assert isinstance(full, FullDir)
    assert sorted(fast._smtp_methods) == sorted(full._smtp_methods)
    assert "DATA" in fast._smtp_methods and "EHLO" in fast._smtp_methods
    assert sorted(fast._auth_methods) == sorted(full._auth_methods)
    # DATA is RelaySMTP.smtp_DATA's, which streams the message into the spool
    assert sorted(fast._handle_hooks) == sorted(full._handle_hooks) == ["EHLO", "MAIL", "RCPT"]
    assert fast._ehlo_hook_ver == full._ehlo_hook_ver == "new"
