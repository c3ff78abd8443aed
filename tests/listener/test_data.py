"""DATA read in pieces gives exactly what reading it whole gives, wherever the pieces end."""

from __future__ import annotations

import asyncio
import random

import pytest

import relay.listener.data as smtp_data
from relay.listener.data import TooBig, read_data


def whole(stream: bytes) -> tuple[bytes, bytes]:
    """The rules read at once: the message up to CRLF.CRLF unstuffed, and what follows."""
    data = b"\r\n" + stream
    end = data.index(b"\r\n.\r\n")
    return data[:end + 2].replace(b"\r\n.", b"\r\n")[2:], data[end + 5:]


async def streamed(stream: bytes, limit: int | None = None) -> tuple[bytes, bytes, int]:
    """The message as read_data passes it on, what stays in the reader, how many writes."""
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    pieces: list[bytes] = []

    async def write(piece: bytearray) -> None:
        pieces.append(bytes(piece))

    await read_data(reader, limit, write)
    return b"".join(pieces), await reader.read(), len(pieces)


SHAPES = [
    b".\r\n", b"a\r\n.\r\n", b"..\r\n.\r\n", b"a\r\n..b\r\n...\r\n.\r\nNOOP\r\n",
    b"x\n.\r\ny\r.\nz\n.\nw\r\n.\rv\r.\r\n.\r\n", b"\r\n\r\n.\r\n", b".a\r\n.\r\nQUIT\r\n",
    b"a\r\n.\r\n.\r\n", b"line\r\n.. \r\n.\r\n",
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 64])
async def test_pieces_read_the_same_as_the_whole_message_at_every_boundary(
        chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_data, "CHUNK", chunk)
    rng = random.Random(chunk)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]
    shapes = SHAPES + [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
                       + b"\r\n.\r\nRSET\r\n" for _ in range(300)]
    for stream in shapes:
        message, rest, _ = await streamed(stream)
        assert (message, rest) == whole(stream), stream


async def test_a_large_message_is_passed_on_in_pieces_as_it_arrives() -> None:
    body = (b"x" * 998 + b"\r\n") * 2000 + b".\r\n"  # about 2 MB
    message, rest, writes = await streamed(body)
    assert message == body[:-3] and rest == b""
    assert writes >= len(body) // smtp_data.CHUNK  # never held whole


async def test_too_big_reads_to_the_end_and_passes_nothing_past_the_limit() -> None:
    body = b"y" * 998 + b"\r\n"
    reader = asyncio.StreamReader()
    reader.feed_data(body * 300 + b".\r\nNOOP\r\n")
    reader.feed_eof()
    passed: list[int] = []

    async def write(piece: bytearray) -> None:
        passed.append(len(piece))

    with pytest.raises(TooBig):
        await read_data(reader, 100_000, write)
    assert sum(passed) <= 100_000
    assert await reader.read() == b"NOOP\r\n"  # the session goes on after the 552


async def test_a_client_that_hangs_up_in_data_is_a_connection_reset() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"Subject: cut\r\n\r\nhalf a message")
    reader.feed_eof()

    async def write(piece: bytearray) -> None:
        pass

    with pytest.raises(ConnectionResetError):
        await read_data(reader, None, write)


async def trickled(stream: bytes, limit: int, rng: random.Random) -> tuple[bytes, bytes]:
    """read_data on a reader of the given limit, the stream arriving in random pieces."""
    reader = asyncio.StreamReader(limit=limit)
    pieces: list[bytes] = []

    async def write(piece: bytearray) -> None:
        pieces.append(bytes(piece))

    reading = asyncio.create_task(read_data(reader, None, write))
    at = 0
    while at < len(stream):
        step = rng.randrange(1, 9)
        reader.feed_data(stream[at:at + step])
        at += step
        await asyncio.sleep(0)  # let read_data take what has arrived
    reader.feed_eof()
    await reading
    return b"".join(pieces), await reader.read()


@pytest.mark.parametrize("limit", [1, 2, 4, 5, 6, 9, 64])
async def test_the_end_is_found_and_nothing_after_it_read_whatever_the_readers_limit(
        limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's limit decides where readuntil gives up; the end may straddle any
    two arrivals; what follows the final dot stays in the reader, for the session."""
    monkeypatch.setattr(smtp_data, "CHUNK", 3)
    rng = random.Random(limit)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"xyz" * 5]
    shapes = SHAPES + [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
                       + b"\r\n.\r\nRSET\r\n" for _ in range(200)]
    for stream in shapes:
        assert await trickled(stream, limit, rng) == whole(stream), stream
