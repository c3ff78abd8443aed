"""The relay's DATA, from memory or from the spool file in chunks: the same bytes on the wire.

The reference is aiosmtplib's own DATA (`SMTP.sendmail`) with the same message.
Chunks are made a few bytes long here so that every boundary case happens: a dot
right after a boundary, a CR at the end of a chunk whose LF starts the next, a line
longer than a chunk.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from relay.errors import PermanentFailure, TemporaryFailure
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.spool.store import Envelope, Recipient
from relay.upstream import body as smtp_body
from relay.upstream.base import Outgoing
from relay.upstream.smtp_pool import SmtpUpstream
from tests.upstream_servers import Script, Servers, hangs_up_in_data

SENDER = "notify@example.com"
HEADER = b"From: notify@example.com\r\nSubject: report\r\n\r\n"
TRICKY = [b".", b"..", b".\r\n", b"\r\n.\r\n", b"\r", b"\n", b"\r\r\n", b"\n.", b"x" * 40,
          b"\r\n", b"abc", "ü".encode(), b".x\r\n", b"\n\n"]


@pytest.fixture(params=["one command at a time", "pipelined"])
async def servers(request: pytest.FixtureRequest) -> AsyncIterator[Servers]:
    started = Servers(pipelining=request.param == "pipelined")
    yield started
    await started.close()


def outgoing(tmp_path: Path, name: str, data: bytes, *, in_memory: bool) -> Outgoing:
    envelope = Envelope(id=name, sender="app@example.com", recipients=[Recipient("a@example.com")],
                        mail_from=SENDER, size=len(data))
    path = tmp_path / name
    path.write_bytes(data)
    return Outgoing(envelope, path, SENDER, envelope.recipients, data if in_memory else None)


def upstream(port: int) -> SmtpUpstream:
    settings = ServerSettings(host="127.0.0.1", port=port, encryption="none", timeout=2)
    return SmtpUpstream("test", settings, Metrics(), "relay.test")


def random_message(rng: random.Random) -> bytes:
    return HEADER + b"".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
async def test_streamed_message_arrives_exactly_as_the_in_memory_one(
        servers: Servers, tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_body, "CHUNK", chunk)
    script = Script()
    port = await servers.smtp(script)
    relay = upstream(port)
    rng = random.Random(chunk)
    messages = [random_message(rng) for _ in range(40)]
    messages += [HEADER + b".leading dot\r\n", HEADER + b"no final line end", HEADER + b"end\r",
                 HEADER + b"x" * 200 + b"\r\n." + b"y" * 200, HEADER]
    reference = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=2)
    await reference.connect()
    try:
        for i, data in enumerate(messages):
            await reference.sendmail(SENDER, ["a@example.com"], data)
            for in_memory in (True, False):
                message = outgoing(tmp_path, f"m{i}-{in_memory}", data, in_memory=in_memory)
                outcomes = await relay.deliver(message)
                assert [o.failure for o in outcomes] == [None]
            aiosmtplib_sent, from_memory, streamed = script.messages[-3:]
            assert from_memory.data == aiosmtplib_sent.data, data
            assert streamed.data == aiosmtplib_sent.data, data
    finally:
        await relay.close()
        await reference.quit()


async def test_streamed_message_keeps_size_and_8bit_declarations(
        servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_body, "CHUNK", 5)
    script = Script()
    relay = upstream(await servers.smtp(script))
    data = HEADER + "Grüße\r\n".encode() * 10
    try:
        await relay.deliver(outgoing(tmp_path, "eight", data, in_memory=False))
    finally:
        await relay.close()
    assert "BODY=8BITMIME" in script.lines[0] and f"SIZE={len(data)}" in script.lines[0]


async def test_refusal_at_the_end_of_a_streamed_message_is_permanent(
        servers: Servers, tmp_path: Path) -> None:
    script = Script(data_replies=["552 5.3.4 message too big for this mailbox"])
    relay = upstream(await servers.smtp(script))
    try:
        with pytest.raises(PermanentFailure) as caught:
            await relay.deliver(outgoing(tmp_path, "big", HEADER + b"x\r\n" * 1000,
                                         in_memory=False))
    finally:
        await relay.close()
    assert caught.value.stage == "DATA" and "552 5.3.4" in caught.value.reply


async def test_server_hanging_up_during_a_streamed_message_is_temporary(
        servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_body, "CHUNK", 4096)
    relay = upstream(await servers.raw(hangs_up_in_data))
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await relay.deliver(outgoing(tmp_path, "cut", HEADER + b"y" * 78 * 10_000,
                                         in_memory=False))
    finally:
        await relay.close()
    assert caught.value.stage == "DATA"
