"""The rewrite is applied when a message is sent, for the account as it is then.

The spool keeps the client's bytes (`as_received`); each attempt rewrites them for the
current system address, with the Received line, Date and Message-ID taken from the
envelope, so that every attempt sends the same message. Against a real SMTP server
(aiosmtpd on port 0) and the built-in local outbox.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from relay.app import Relay
from relay.settings import load_settings
from relay.spool.store import INLINE_BYTES, Envelope, Recipient, Spool, new_queue_id
from tests.rewrite_shapes import as_sent
from tests.support import RawSMTP, RelayFactory, listener_port, outbox_files, wait_until
from tests.upstream_servers import Script, Servers

OLD, NEW = "old-notify@old.example", "new-notify@new.example"
CLIENT_MESSAGE = (b"From: App <app@a.example>\rFrom: Director <director@bank.example>\r\n"
                  b"Sender: Other <other@evil.example>\r\nSubject: approve\r\n\r\nPlease.\r\n")


def addresses(msg: EmailMessage, name: str) -> list[str]:
    return [a.addr_spec for h in msg.get_all(name) or [] for a in h.addresses]


async def send(relay: Relay, data: bytes, *rcpts: str) -> str:
    client = await RawSMTP.connect(listener_port(relay))
    await client.cmd("EHLO app.example.com")
    reply = await client.transaction(data + b".\r\n", rcpts=rcpts or ("boss@example.com",))
    await client.close()
    assert reply.startswith("250"), reply
    return reply.rsplit(" ", 1)[1]


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    await started.close()


def config_text(state: Path, port: int, *, active: bool, address: str) -> str:
    return (f'state_dir = "{state}"\n[listener]\nport = 0\n'
            f'[system_account]\nactive = {str(active).lower()}\naddress = "{address}"\n'
            f'server = "up"\n[servers.up]\nhost = "127.0.0.1"\nport = {port}\n'
            'encryption = "none"\n')


@pytest.mark.parametrize("size", ["small", "large"])
async def test_held_mail_goes_out_with_the_address_the_account_has_when_it_is_sent(
        tmp_path: Path, servers: Servers, size: str) -> None:
    script = Script()
    port = await servers.smtp(script)
    config, state = tmp_path / "relay.toml", tmp_path / "state"
    config.write_text(config_text(state, port, active=False, address=OLD))
    body = b"Please.\r\n" if size == "small" else b"x" * 998 + b"\r\n" * (INLINE_BYTES // 999 + 2)
    relay = Relay(load_settings(config), config)
    await relay.start()
    try:
        queue_id = await send(relay, CLIENT_MESSAGE.replace(b"Please.\r\n", body))
        await asyncio.sleep(0.2)  # held: nothing may go out meanwhile
        assert script.messages == []
        config.write_text(config_text(state, port, active=True, address=NEW))  # the seed's flow
        assert relay.reload()
        await wait_until(lambda: len(script.messages) == 1)
    finally:
        await relay.stop(grace=1)
    (sent,) = script.messages
    assert sent.mail_from == NEW
    msg = as_sent(sent.data)
    assert addresses(msg, "From") == [NEW]
    assert msg["From"].addresses[0].display_name == "App"
    assert addresses(msg, "Reply-To") == ["app@a.example", "director@bank.example"]
    assert msg.get_all("Sender") is None
    assert msg["Message-ID"] == f"<{queue_id}@new.example>"
    assert msg.get_payload(decode=True) == body
    assert OLD.encode() not in sent.data


async def test_a_retry_after_a_partial_delivery_sends_the_same_message_id_date_and_received(
        relay_factory: RelayFactory, servers: Servers) -> None:
    script = Script(rcpt_replies={"later@example.com": ["451 4.2.1 try later"]})
    port = await servers.smtp(script)
    relay = await relay_factory(
        system_account={"address": NEW, "server": "up"},
        servers={"up": {"host": "127.0.0.1", "port": port, "encryption": "none"}},
        queue={"retry_initial": "0.2s", "retry_max": "0.4s"})
    await send(relay, b"Subject: no date, no id\r\n\r\nbody\r\n", "now@example.com",
               "later@example.com")
    await wait_until(lambda: len(script.messages) == 2)
    first, second = script.messages
    assert (first.rcpt_tos, second.rcpt_tos) == (["now@example.com"], ["later@example.com"])
    assert first.data == second.data  # Received, Date, Message-ID: all the same bytes
    msg = as_sent(first.data)
    assert msg["Message-ID"] and msg["Date"] and len(msg.get_all("Received") or []) == 1


async def test_an_entry_written_by_an_earlier_version_is_sent_as_stored(
        relay_factory: RelayFactory, servers: Servers, state_dir: Path) -> None:
    script = Script()
    port = await servers.smtp(script)
    stored = b"Received: x\r\nFrom: App <old@old.example>\r\nFrom: second <s@x>\r\n\r\nbody\r\n"
    spool = Spool(state_dir / "spool")
    spool.open()
    env = Envelope(id=new_queue_id(), sender="app@a.example", recipients=[Recipient("b@x.example")],
                   mail_from=OLD, size=len(stored))
    spool.store_batch([(env, stored)])
    spool.close()
    await relay_factory(system_account={"address": NEW, "server": "up"},
                        servers={"up": {"host": "127.0.0.1", "port": port, "encryption": "none"}})
    await wait_until(lambda: len(script.messages) == 1)
    assert (script.messages[0].mail_from, script.messages[0].data) == (OLD, stored)


LARGE_BODY = (b"y" * 998 + b"\r\n") * (INLINE_BYTES // 1000 + 1)


@pytest.mark.parametrize("message", [CLIENT_MESSAGE, b"Hello world\r\n",
                                     CLIENT_MESSAGE + LARGE_BODY, LARGE_BODY],
                         ids=["small", "no-header", "large", "large-no-header"])
async def test_the_local_outbox_holds_the_message_as_rewritten_when_sent(
        relay_factory: RelayFactory, state_dir: Path, message: bytes) -> None:
    relay = await relay_factory()
    await send(relay, message)
    await wait_until(lambda: len(outbox_files(state_dir)) == 1)
    data = outbox_files(state_dir)[0].read_bytes()
    assert data.startswith(b"Return-Path: <relay@localhost>\r\nDelivered-To: boss@example.com\r\n"
                           b"Received: from app.example.com ([127.0.0.1])")
    msg = as_sent(data)
    assert addresses(msg, "From") == ["relay@localhost"] and msg.defects == []
    body = message.split(b"\r\n\r\n", 1)[-1]
    assert msg.get_payload(decode=True) == re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    assert data.endswith(body)
