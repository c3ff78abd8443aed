"""Reading the message of a DATA command in large pieces, passing it on as it arrives.

aiosmtpd reads DATA line by line in Python and keeps the whole message in memory.
This takes from the session's `asyncio.StreamReader` (public methods only) up to
the end of the message, at most a chunk at a time, undoes dot-stuffing with one
replace per piece, and hands each piece to a writer (the spool's incoming file)
before it reads on: a session holds a chunk and a few bytes whatever the
message's size.

Only CRLF "." CRLF ends the message: a bare CR or LF around the dot never does, so
SMTP smuggling (`LF.CRLF`, `CR.LF`, `LF.LF`, ...) leaves the rest inside this
message. Nothing past the final dot is read: commands the client pipelined after
it stay in the reader for the session.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

END = b"\r\n.\r\n"
CHUNK = 1 << 16
"""The most that is taken from the reader (and passed on) at once."""
_STUFFED = b"\r\n."
_STUFFED_AT = re.compile(re.escape(_STUFFED))
"""Looking for it with `re` takes about half the time of bytearray.find (CPython 3.11)."""
_HELD = 3
"""Bytes kept back from each piece: they may be the final ".\r\n", not the message."""


class TooBig(Exception):
    """The message exceeded the limit; its bytes were read to the end and dropped."""


def _matched(tail: bytes | bytearray) -> int:
    """How many of END's first bytes `tail` ends with (the most: an end may start there)."""
    for n in (4, 3, 2, 1):
        if tail.endswith(END[:n]):
            return n
    return 0


async def _next_piece(reader: asyncio.StreamReader, matched: int) -> tuple[bytes, bool, int]:
    """The next bytes of the stream, never past the first END: (the bytes, whether they
    end with END, how many bytes after them are known to hold no END's start).

    `matched` is how many of END's first bytes the stream read so far ends with. While
    it is not 0 an end may straddle what was read, so exactly as many bytes are read as
    could complete it (an end cannot finish sooner). From 0 on, `readuntil` finds the
    end; when it is not within the reader's limit, the reader says how far no end
    starts (it searched that far), so those bytes are read without searching again
    and an end never straddles two pieces.
    """
    try:
        if matched:
            return await reader.readexactly(len(END) - matched), False, 0
        return await reader.readuntil(END), True, 0
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client closed the connection during DATA") from None
    except asyncio.LimitOverrunError as e:
        piece = await reader.read(min(e.consumed, CHUNK))
        return piece, False, e.consumed - len(piece)


async def read_data(reader: asyncio.StreamReader, limit: int | None,
                    write: Callable[[bytearray], Awaitable[None]]) -> None:
    """Pass the message up to the final dot to `write`, dot-stuffing undone (RFC 5321
    4.5.2), in pieces as they arrive; each `write` is awaited before more is read.

    Raises TooBig beyond `limit` bytes (after reading to the final dot; nothing past
    the limit is passed on) and ConnectionResetError if the client hangs up before
    the final dot.
    """
    # `held` starts with the two bytes before what is not passed on yet: a dot is
    # removed when a line end precedes it, which may have been in the last piece. The
    # line end before the first line makes ".\r\n" alone an end too.
    held = bytearray(b"\r\n")
    matched = 2
    size = 0  # bytes of the message as sent (dot-stuffed), passed on or dropped
    clear = 0  # bytes in the reader known to hold no END's start
    while True:
        if clear:
            piece, done = await reader.read(min(clear, CHUNK)), False
            clear -= len(piece)
        else:
            piece, done, clear = await _next_piece(reader, matched)
        held += piece
        if matched:
            done = held.endswith(END)
            matched = 0 if done else _matched(held[-4:])
        cut = len(held) - _HELD  # with `done`: the message's last line end is its own
        if cut <= 2 and not done:
            continue
        size += cut - 2
        if cut > 2 and (limit is None or size <= limit):
            if _STUFFED_AT.search(held, 0, cut) is not None:
                await write(held[:cut].replace(_STUFFED, b"\r\n")[2:])
            else:
                await write(held[2:cut])
        if done:
            break
        del held[:cut - 2]
    if limit is not None and size > limit:
        raise TooBig
