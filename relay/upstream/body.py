"""The message a transaction sends, after DATA: from memory, or from its spool file.

A message up to `spool.INLINE_BYTES` comes from the scheduler in memory; a larger
one is sent from its file a chunk at a time (after its rewritten header block, when
the file holds the client's bytes), so that the relay never holds more than a chunk
of its body. Either way the bytes on the wire are what aiosmtplib's own DATA
would send (a bare CR or LF becomes CRLF, a line starting with "." gets another),
without its two passes of regular expressions over every message: the usual
message, CRLF only and no line starting with a dot, goes out as it is.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

from relay.upstream.base import Outgoing
from relay.upstream.pipeline import Replies

CHUNK = 1 << 20
_JOINED = 1 << 16
"""A message up to this size goes out with its final dot in one write (a copy)."""
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Body:
    size: int
    ascii: bool
    """Only 7-bit bytes (else BODY=8BITMIME is needed)."""
    headers_ascii: bool
    data: bytes | None
    """The bytes, or None: send `head`, then `path` from `offset` on."""
    path: Path
    head: bytes = b""
    offset: int = 0

    @classmethod
    async def of(cls, message: Outgoing) -> Body:
        data = message.data
        if data is not None:
            seven_bit = data.isascii()
            end = data.find(_HEADER_END)
            headers = seven_bit or (data if end < 0 else data[:end]).isascii()
            return cls(len(data), seven_bit, headers, data, message.path)
        head = message.head
        size, ascii_, headers_ascii = await asyncio.to_thread(_scan, message.path,
                                                              message.offset)
        if head:  # the whole header block: what follows it in the file is the body
            headers_ascii = head.isascii()
            ascii_ = ascii_ and headers_ascii
        return cls(size + len(head), ascii_, headers_ascii, None, message.path, head,
                   message.offset)

    async def write(self, out: Replies, wait: float) -> None:
        """The message and the final dot, after the server's 354 to DATA.

        `wait` bounds each wait for room to write more (a large message)."""
        if self.data is not None:
            wire = _wire_form(self.data, line_start=True)
            end = b".\r\n" if wire.endswith(b"\r\n") else b"\r\n.\r\n"
            if len(wire) <= _JOINED:  # one write, one segment: cheaper than a second send
                out.write(wire + end)
            else:
                out.write(wire)
                out.write(end)
            return
        crlf = await _write_file(out, self.path, wait, self.head, self.offset)
        out.write(b".\r\n" if crlf else b"\r\n.\r\n")


def _scan(path: Path, offset: int = 0) -> tuple[int, bool, bool]:
    """Size, all 7-bit, headers 7-bit of the file from `offset`: read a chunk at a time."""
    size, all_ascii, headers_ascii, in_headers, tail = 0, True, True, True, b""
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            size += len(chunk)
            all_ascii = all_ascii and chunk.isascii()
            if in_headers:
                window = tail + chunk
                end = window.find(_HEADER_END)
                headers_ascii = headers_ascii and (window if end < 0 else window[:end]).isascii()
                in_headers = end < 0
                tail = window[-(len(_HEADER_END) - 1):]
    return size, all_ascii, headers_ascii


def _wire_form(block: bytes, *, line_start: bool) -> bytes:
    """`block` as it goes after DATA: every line end CRLF, a dot starting a line doubled.

    What aiosmtplib does with two regular expressions over the whole message; here the
    usual message (CRLF only, no line starting with a dot) is only counted, not copied.
    `line_start`: the block starts a line (else a dot at its start is mid-line).
    """
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        block = _LINE_ENDS.sub(b"\r\n", block)
    if b"\n." in block:
        block = block.replace(b"\n.", b"\n..")
    if line_start and block.startswith(b"."):
        block = b"." + block
    return block


async def _write_file(out: Replies, path: Path, wait: float, head: bytes = b"",
                      offset: int = 0) -> bool:
    """Send `head`, then the file from `offset` a chunk at a time; True when what was sent
    ends with CRLF."""
    carry, line_start, crlf = head, True, False
    with path.open("rb") as f:
        f.seek(offset)
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            block = carry + chunk
            if chunk:  # send whole lines; keep the rest (and a CR whose LF may follow)
                cut = block.rfind(b"\n") + 1 or len(block) - block.endswith(b"\r")
                block, carry = block[:cut], block[cut:]
            if block:
                wire = _wire_form(block, line_start=line_start)
                out.write(wire)
                await out.drain(wait)
                line_start = crlf = wire.endswith(b"\r\n")
            if not chunk:
                return crlf
