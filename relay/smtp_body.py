"""The message a transaction sends: in memory, or streamed from its spool file.

A message up to `spool.INLINE_BYTES` comes from the scheduler in memory and goes
through aiosmtplib's DATA. A larger one is sent from its file a chunk at a time,
each chunk treated as aiosmtplib treats a whole message (a bare CR or LF becomes
CRLF, a line starting with "." gets another), so that the relay never holds more
than a chunk of it in memory.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from .upstream import Outgoing

CHUNK = 1 << 20
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LINE_START_DOT = re.compile(rb"(?m)^\.")
_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Body:
    size: int
    ascii: bool
    """Only 7-bit bytes (else BODY=8BITMIME is needed)."""
    headers_ascii: bool
    data: bytes | None
    """The bytes, or None: send them from `path`."""
    path: Path

    @classmethod
    async def of(cls, message: Outgoing) -> Body:
        data = message.data
        if data is not None:
            return cls(len(data), data.isascii(), data.split(_HEADER_END, 1)[0].isascii(),
                       data, message.path)
        size, ascii_, headers_ascii = await asyncio.to_thread(_scan, message.path)
        return cls(size, ascii_, headers_ascii, None, message.path)

    async def send(self, client: aiosmtplib.SMTP, wait: float) -> aiosmtplib.SMTPResponse:
        """DATA, the message, the final dot; the server's reply (SMTPDataError unless 250).

        `wait` bounds each wait for the server: a reply, or room to write more."""
        if self.data is not None:
            return await client.data(self.data)
        return await _send_file(client, self.path, wait)


def _scan(path: Path) -> tuple[int, bool, bool]:
    """Size, all 7-bit, headers 7-bit: read a chunk at a time."""
    size, all_ascii, headers_ascii, in_headers, tail = 0, True, True, True, b""
    with path.open("rb") as f:
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


async def _send_file(client: aiosmtplib.SMTP, path: Path,
                     wait: float) -> aiosmtplib.SMTPResponse:
    start = await client.execute_command(b"DATA", timeout=wait)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # What aiosmtplib's own DATA does before it writes: a reply that arrives while the
    # message is still going out (a refusal) is kept for read_response, not dropped.
    protocol._response_pending = True
    carry, line_start, ends_with_crlf = b"", True, False
    with path.open("rb") as f:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            block = carry + chunk
            if chunk:  # send whole lines; keep the rest (and a CR whose LF may follow)
                cut = block.rfind(b"\n") + 1 or len(block) - block.endswith(b"\r")
                block, carry = block[:cut], block[cut:]
            if block:
                out = _LINE_START_DOT.sub(b"..", _LINE_ENDS.sub(b"\r\n", block))
                if not line_start and block.startswith(b"."):
                    out = out[1:]  # mid-line: that dot is not at the start of a line
                protocol.write(out)
                await asyncio.wait_for(protocol._drain_helper(), wait)
                line_start = ends_with_crlf = out.endswith(b"\r\n")
            if not chunk:
                break
    protocol.write(b".\r\n" if ends_with_crlf else b"\r\n.\r\n")
    reply = await protocol.read_response(timeout=wait)
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply
