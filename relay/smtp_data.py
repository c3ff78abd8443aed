"""Reading the message of a DATA command in large chunks.

aiosmtpd reads DATA line by line in Python, which is most of the listener's work
for a 100 KiB message. This reads what the socket has, finds the end with one
search per chunk, and undoes dot-stuffing with one replace: the same result, the
same rules.

Only CRLF "." CRLF ends the message: a bare CR or LF around the dot never does, so
SMTP smuggling (`LF.CRLF`, `CR.LF`, `LF.LF`, ...) leaves the rest inside this
message. Commands the client pipelined after the final dot stay in the stream.
"""

from __future__ import annotations

import asyncio

END = b"\r\n.\r\n"
CHUNK = 1 << 16


class TooBig(Exception):
    """The message exceeded the limit; its bytes were read to the end and dropped."""


async def read_data(reader: asyncio.StreamReader, limit: int | None) -> bytearray:
    """The message up to the final dot, dot-stuffing undone (RFC 5321 4.5.2).

    A bytearray, the buffer it was read into: a 25 MiB message takes 25 MiB.

    Raises TooBig beyond `limit` bytes (after reading to the final dot, keeping
    only a few bytes in memory meanwhile) and ConnectionResetError if the client
    hangs up before the final dot.
    """
    data = bytearray(b"\r\n")  # a line end before the first line: ".\r\n" alone ends it too
    dropped = 0
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise ConnectionResetError("the client closed the connection during DATA")
        searched = max(0, len(data) - len(END) + 1)
        data += chunk
        end = data.find(END, searched)
        if end >= 0:
            if len(data) > end + len(END):  # pipelined commands: give them back to the reader
                reader._buffer[0:0] = data[end + len(END):]  # type: ignore[attr-defined]
            break
        if limit is not None and dropped + len(data) - 2 > limit:
            keep = len(END) - 1  # enough to find an end split across two chunks
            dropped += len(data) - keep
            del data[:-keep]
    if dropped or (limit is not None and end > limit):
        raise TooBig
    if data.find(b"\r\n.", 0, end + 2) >= 0:
        data = data[:end + 2].replace(b"\r\n.", b"\r\n")
    else:
        del data[end + 2:]  # in place: a large message is never copied
    del data[:2]
    return data
