"""The message a transaction sends (relay.upstream.message): from memory, or read from
its spool file (a rewritten header block, then the file from an offset): the same bytes
on the wire as aiosmtplib's own `SMTP.sendmail` with the same message, since both go
through its public `data()`. The messages hold every line-end and dot case: a dot
starting a line, bare CR and LF, CR LF split, no final line end.
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
from relay.upstream.base import Outgoing
from relay.upstream.message import DATA_RATE, Body
from relay.upstream.smtp_pool import SmtpUpstream
from tests.upstream_servers import Script, Servers, hangs_up_in_data

SENDER = "notify@example.com"
HEADER = b"From: notify@example.com\r\nSubject: report\r\n\r\n"
TRICKY = [b".", b"..", b".\r\n", b"\r\n.\r\n", b"\r", b"\n", b"\r\r\n", b"\n.", b"x" * 40,
          b"\r\n", b"abc", "ü".encode(), b".x\r\n", b"\n\n"]


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    await started.close()


def outgoing(tmp_path: Path, name: str, data: bytes, *, in_memory: bool,
             split: int = 0) -> Outgoing:
    """The message in memory, or in a file after a spool-like prefix of its own; with
    `split`, its first `split` bytes are the rewritten head and the file holds the rest."""
    envelope = Envelope(id=name, sender="app@example.com", recipients=[Recipient("a@example.com")],
                        mail_from=SENDER, size=len(data))
    path = tmp_path / name
    prefix = b"X-Spool-Entry: not part of the message\r\n"
    path.write_bytes(prefix + data[split:])
    if in_memory:
        return Outgoing(envelope, path, SENDER, envelope.recipients, data)
    return Outgoing(envelope, path, SENDER, envelope.recipients, None, head=data[:split],
                    offset=len(prefix))


def upstream(port: int) -> SmtpUpstream:
    settings = ServerSettings(host="127.0.0.1", port=port, encryption="none", timeout=2)
    return SmtpUpstream("test", settings, Metrics(), "relay.test")


def random_message(rng: random.Random) -> bytes:
    return HEADER + b"".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_message_read_from_its_file_arrives_exactly_as_aiosmtplib_sends_it(
        servers: Servers, tmp_path: Path, seed: int) -> None:
    script = Script()
    port = await servers.smtp(script)
    relay = upstream(port)
    rng = random.Random(seed)
    messages = [random_message(rng) for _ in range(30)]
    messages += [HEADER + b".leading dot\r\n", HEADER + b"no final line end", HEADER + b"end\r",
                 HEADER + b"x" * 200 + b"\r\n." + b"y" * 200, HEADER]
    reference = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=2)
    await reference.connect()
    try:
        for i, data in enumerate(messages):
            await reference.sendmail(SENDER, ["a@example.com"], data)
            forms = [{"in_memory": True}, {"in_memory": False},
                     {"in_memory": False, "split": len(HEADER)}]
            for n, form in enumerate(forms):
                message = outgoing(tmp_path, f"m{i}-{n}", data, **form)  # type: ignore[arg-type]
                outcomes = await relay.deliver(message)
                assert [o.failure for o in outcomes] == [None]
            aiosmtplib_sent, *ours = script.messages[-4:]
            assert [m.data for m in ours] == [aiosmtplib_sent.data] * 3, data
    finally:
        await relay.close()
        await reference.quit()


async def test_message_from_its_file_keeps_size_and_8bit_declarations(
        servers: Servers, tmp_path: Path) -> None:
    script = Script()
    relay = upstream(await servers.smtp(script))
    data = HEADER + "Grüße\r\n".encode() * 10
    try:
        await relay.deliver(outgoing(tmp_path, "eight", data, in_memory=False, split=10))
    finally:
        await relay.close()
    assert "BODY=8BITMIME" in script.lines[0] and f"SIZE={len(data)}" in script.lines[0]


async def test_refusal_at_the_end_of_a_message_from_its_file_is_permanent(
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


async def test_server_hanging_up_during_a_message_from_its_file_is_temporary(
        servers: Servers, tmp_path: Path) -> None:
    relay = upstream(await servers.raw(hangs_up_in_data))
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await relay.deliver(outgoing(tmp_path, "cut", HEADER + b"y" * 78 * 10_000,
                                         in_memory=False))
    finally:
        await relay.close()
    assert caught.value.stage == "DATA"


def test_data_gets_the_server_timeout_once_more_for_every_mib_of_the_message() -> None:
    """aiosmtplib's data() bounds the whole DATA (writing included) by one timeout: a
    large message on a slow link gets one more `timeout` per MiB, as the chunked
    sending before it did (one per MiB written)."""
    def timeout_for(size: int) -> float:
        return Body(b"x" * size, True, True).data_timeout(10)

    assert timeout_for(1024) == 10
    assert timeout_for(DATA_RATE - 1) == 10
    assert timeout_for(DATA_RATE) == 20
    assert timeout_for(25 * DATA_RATE) == 260
