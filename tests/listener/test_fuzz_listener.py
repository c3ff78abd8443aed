"""Hostile SMTP input: thousands of random, malformed and truncated sessions over real sockets.

A seeded generator (reproducible: the seed is in the test id) mixes valid commands,
garbage, binary, over-long lines, pipelined bursts, DATA with smuggling sequences and
early disconnects. The listener must answer every complete command line with a
well-formed reply, never hang, and keep serving; messages it acknowledged are in the
spool, whole.
"""

from __future__ import annotations

import asyncio
import os
import random
import re

import pytest

from tests.support import RelayFactory, listener_port, wait_until

SESSIONS = int(os.environ.get("SYSMAIL_FUZZ_SESSIONS", "10000"))
CONCURRENCY = 20
_REPLY = re.compile(rb"^[2-5][0-9][0-9][ -]")

VERBS = [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT",
         b"VRFY", b"EXPN", b"HELP", b"AUTH", b"STARTTLS", b"BDAT", b"ETRN", b"XCLIENT"]
ADDRESSES = [b"<a@example.com>", b"<>", b"<\xc3\xbc@example.com>", b"<a b@c>", b"<@x:a@b>",
             b"a@example.com", b"<a@example.com> SIZE=99999999999", b"<a@[127.0.0.1]>",
             b"<" + b"x" * 300 + b"@example.com>", b"<a@example.com> BODY=8BITMIME SMTPUTF8",
             b"<a@example.com> NOTIFY=SUCCESS ORCPT=rfc822;a@b", b"<a\r\n@b>"]
SMUGGLING = [b"\n.\r\n", b"\r.\n", b"\n.\n", b"\r\n.\r", b"\r.\r\n"]


def random_line(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.45:
        verb = rng.choice(VERBS)
        arg = rng.choice(ADDRESSES) if verb.endswith(b":") else rng.choice(
            [b"", b" client.example", b" " + bytes(rng.randrange(256) for _ in range(8))])
        return verb + arg
    if kind < 0.65:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
    if kind < 0.75:
        return rng.choice(VERBS) + b" " + b"A" * rng.choice([600, 1100, 5000, 70000])
    if kind < 0.85:
        return b""
    return rng.choice([b"\x00\x00", b"\xff\xfe", b"MAIL FROM:<a@b>\rRCPT TO:<c@d>",
                       b"DATA\nDATA", b"\x1b[31mred"])


def random_session(rng: random.Random) -> list[bytes]:
    """A list of chunks to send; a chunk of b'' means: hang up here."""
    chunks: list[bytes] = []
    if rng.random() < 0.5:  # a plausible start, so DATA paths get exercised
        chunks.append(b"EHLO fuzz.example\r\nMAIL FROM:<a@example.com>\r\n"
                      b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        body = b"Subject: fuzz\r\n\r\n" + bytes(rng.randrange(256) for _ in range(200))
        body += rng.choice(SMUGGLING) + b"MAIL FROM:<evil@example.com>\r\n"
        if rng.random() < 0.8:
            body += b"\r\n.\r\n"
        chunks.append(body)
    for _ in range(rng.randrange(0, 12)):
        line = random_line(rng) + rng.choice([b"\r\n", b"\r\n", b"\n", b""])
        chunks.append(line)
    if rng.random() < 0.3:
        chunks.append(b"")  # early disconnect
    elif rng.random() < 0.5:
        chunks.append(b"QUIT\r\n")
    return chunks


async def run_session(port: int, chunks: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = []
    try:
        replies.append(await asyncio.wait_for(reader.readline(), 10))
        for chunk in chunks:
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        while line := await asyncio.wait_for(reader.readline(), 10):
            replies.append(line)
    except (ConnectionError, OSError):
        pass  # the server may close first (QUIT, 421, a line too long): that is allowed
    finally:
        writer.close()
    return replies


@pytest.mark.parametrize("seed", [20261124])
async def test_random_sessions_never_crash_or_hang_the_listener(
        relay_factory: RelayFactory, seed: int) -> None:
    relay = await relay_factory(system_account={"active": False},
                                listener={"max_message_size": 100_000})
    port = listener_port(relay)
    rng = random.Random(seed)
    sessions = [random_session(rng) for _ in range(SESSIONS)]
    bad_replies: list[bytes] = []
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(chunks: list[bytes]) -> None:
        async with semaphore:
            for reply in await run_session(port, chunks):
                if not _REPLY.match(reply):
                    bad_replies.append(reply)

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in sessions)), 600)
    assert bad_replies == []
    # still serving, with no session left behind
    await wait_until(lambda: not relay.listener._sessions)  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220 ")
    writer.close()
    # nothing left half-written (a message whose client left during its commit still
    # finishes it), and whatever was acknowledged is whole: one message per entry, the
    # client's bytes as they came (the Received line is added when it is sent)
    await wait_until(lambda: os.listdir(relay.spool.root / "incoming") == [])
    for queue_id in relay.spool.ids("queue"):
        data = relay.spool.read_message(queue_id, "queue")
        # the client's bytes as they came (the rewrite comes when it is sent): one
        # message, from its first line
        assert data.startswith(b"Subject: fuzz\r\n\r\n") and data.count(b"Subject: fuzz") == 1
        env = relay.spool.read(queue_id, "queue")
        assert env.as_received and env.size == len(data)
        assert data.count(b"\r\nReceived: ") + data.startswith(b"Received: ") == 0
