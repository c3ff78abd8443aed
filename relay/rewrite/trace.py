"""The Received trace line the relay puts first, and the Date it adds: the values a
client gave (HELO name, address) are sanitised so they cannot break the header."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

_NOT_HOST = re.compile(r"[^A-Za-z0-9.:_\[\]-]")
_NOT_ADDR = re.compile(r"[\x00-\x20\x7f<>]")
_HELO_LIMIT = 255
_ADDR_LIMIT = 320


@functools.lru_cache(maxsize=2)
def date_header_value(when: datetime) -> str:
    """RFC 5322 date-time of `when` (whole seconds); the same second is formatted once."""
    return format_datetime(when)


def received_header(
    *, helo: str | None, peer_ip: str, by_host: str, queue_id: str,
    recipients: Sequence[str], when: datetime, with_protocol: str = "ESMTP",
) -> bytes:
    """The Received: trace header for one message; client-given values are sanitised."""
    name, ip, host, qid = (_NOT_HOST.sub("?", s[:_HELO_LIMIT]) for s in
                           (helo or "unknown", peer_ip, by_host, queue_id))
    proto = re.sub(r"[^A-Za-z0-9]", "", with_protocol) or "ESMTP"
    stamp = date_header_value(when.replace(microsecond=0))
    head = f"Received: from {name} ([{ip}])\r\n\tby {host} (sysmail-relay) with {proto} id {qid}"
    if len(recipients) == 1:
        rcpt = _NOT_ADDR.sub("", recipients[0][:_ADDR_LIMIT])
        return f"{head}\r\n\tfor <{rcpt}>; {stamp}\r\n".encode()
    return f"{head};\r\n\t{stamp}\r\n".encode()
