"""The message a transaction sends, in memory, and what MAIL FROM announces about it.

aiosmtplib's public `SMTP.data()` takes the message as one `bytes` (it turns bare
CR and LF into CRLF, doubles a leading dot and adds the final dot itself): it
accepts no file and no iterator. So `Body.of` holds the whole message: the bytes the
scheduler read with its claim (a message up to `spool.INLINE_BYTES`), or, for a
larger one, its rewritten header block followed by the spool file from its offset,
read in a thread. What that costs in memory is in docs/delivery.md;
the listener still streams what it receives.

`mail_options` chooses MAIL FROM's parameters from what the server offers:
SMTPUTF8, BODY=8BITMIME, SIZE, the client's DSN parameters; a message the server
cannot take (non-ASCII addresses without SMTPUTF8, over its SIZE) fails
permanently before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relay.errors import DeliveryFailure, PermanentFailure
from relay.upstream.base import Outgoing

log = logging.getLogger("relay.upstream")

_HEADER_END = b"\r\n\r\n"
_DSN_MAIL = ("RET=", "ENVID=")
DATA_RATE = 1 << 20
"""Bytes of a message the server gets one `timeout` for: DATA waits `timeout` seconds
for each MiB (and one more), so a large message on a slow link is not cut off."""


@dataclass(frozen=True)
class Body:
    data: bytes
    ascii: bool
    """Only 7-bit bytes (else BODY=8BITMIME is needed)."""
    headers_ascii: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @classmethod
    async def of(cls, message: Outgoing) -> Body:
        data = message.data
        if data is None:
            data = await asyncio.to_thread(_read, message.head, message.path, message.offset)
        seven_bit = data.isascii()
        end = data.find(_HEADER_END)
        headers = seven_bit or (data if end < 0 else data[:end]).isascii()
        return cls(data, seven_bit, headers)

    def data_timeout(self, timeout: float) -> float:
        """How long DATA may take, the message written and its reply read."""
        return timeout * (1 + len(self.data) // DATA_RATE)


def _read(head: bytes, path: Path, offset: int) -> bytes:
    """`head`, then the file from `offset` on (after the spool entry's own header)."""
    with path.open("rb") as f:
        f.seek(offset)
        return head + f.read() if head else f.read()


def mail_options(message: Outgoing, body: Body, client: aiosmtplib.SMTP,
                 label: str) -> tuple[list[str], bool]:
    """MAIL FROM's parameters, and whether the addresses go as UTF-8 (SMTPUTF8)."""
    env = message.envelope
    options: list[str] = []
    addresses_ascii = message.mail_from.isascii() and all(
        r.address.isascii() for r in message.recipients)
    utf8 = not addresses_ascii or "SMTPUTF8" in env.mail_options
    if utf8 and client.supports_extension("smtputf8"):
        options.append("SMTPUTF8")
    elif not addresses_ascii:
        raise PermanentFailure(
            f"the message needs SMTPUTF8 (non-ASCII addresses), which {label} does "
            "not offer", stage="MAIL FROM")
    elif utf8 and not body.headers_ascii:
        raise PermanentFailure(
            f"the message has UTF-8 headers (SMTPUTF8), which {label} does not "
            "offer", stage="MAIL FROM")
    else:
        utf8 = False
    if not body.ascii and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    limit = client.esmtp_extensions.get("size", "")
    if limit.isdigit() and int(limit) and body.size > int(limit):
        raise PermanentFailure(
            f"the message is {body.size} bytes; {label} accepts at most {limit} "
            "(its SIZE)", stage="MAIL FROM")
    if client.supports_extension("size"):
        options.append(f"SIZE={body.size}")
    dsn = [o for o in env.mail_options if o.startswith(_DSN_MAIL)]
    if client.supports_extension("dsn"):
        options.extend(dsn)
    elif dsn or any(r.options for r in message.recipients):
        log.info("%s: %s does not offer DSN: delivery status notification requests "
                 "dropped", env.id, label)
    return options, utf8


def eight_bit_refusal(failure: DeliveryFailure, body: Body, client: aiosmtplib.SMTP) -> bool:
    """A permanent refusal of an 8-bit message by a server that does not offer 8BITMIME."""
    return (isinstance(failure, PermanentFailure) and not body.ascii
            and not client.supports_extension("8bitmime"))
