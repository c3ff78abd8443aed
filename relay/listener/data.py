"""Reading the message of a DATA command in large chunks, passing it on as it arrives.

aiosmtpd reads DATA line by line in Python and keeps the whole message in memory.
This reads what the socket has, finds the end with one search per chunk, undoes
dot-stuffing with one replace, and hands each piece to a writer (the spool's
incoming file) before it reads on: a session holds a chunk and a few bytes
whatever the message's size.

Only CRLF "." CRLF ends the message: a bare CR or LF around the dot never does, so
SMTP smuggling (`LF.CRLF`, `CR.LF`, `LF.LF`, ...) leaves the rest inside this
message. Commands the client pipelined after the final dot stay in the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

END = b"\r\n.\r\n"
CHUNK = 1 << 16
_STUFFED = b"\r\n."
_HELD = len(END) - 1
"""Bytes kept back from each chunk: an end that starts there may finish in the next one."""


class TooBig(Exception):
    """The message exceeded the limit; its bytes were read to the end and dropped."""


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
    size = 0  # bytes of the message as sent (dot-stuffed), passed on or dropped
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise ConnectionResetError("the client closed the connection during DATA")
        held += chunk
        end = held.find(END)
        if end >= 0:
            if len(held) > end + len(END):  # pipelined commands: give them back to the reader
                reader._buffer[0:0] = held[end + len(END):]  # type: ignore[attr-defined]
            cut = end + 2  # the message's last line end is its own
        else:
            cut = len(held) - _HELD
            if cut <= 2:
                continue
        size += cut - 2
        if cut > 2 and (limit is None or size <= limit):
            if held.find(_STUFFED, 0, cut) >= 0:
                await write(held[:cut].replace(_STUFFED, b"\r\n")[2:])
            else:
                await write(held[2:cut])
        if end >= 0:
            break
        del held[:cut - 2]
    if limit is not None and size > limit:
        raise TooBig
