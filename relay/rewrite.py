"""Rewrite a message's bytes so that the system address becomes its sender.

Only the header block is parsed; every other byte (body, the other headers, their
order, folding, line endings, 8-bit content, a missing final line ending) is kept.
The edits, all in the header block:

- the Received trace line (see `received_header`) goes first;
- ``from_header="rewrite"``: the first From: becomes one line, the original display
  name of its first mailbox (as written, quoted only when it must be) before the
  system address, or the bare system address when there is none; when the message
  has no Reply-To:, one with the original From: value (verbatim, folding included)
  follows it;
- From: (when absent), Date: and Message-ID: (when missing) are added at the end.

Added lines use the message's own line ending: bare LF when its first line ends in a
bare LF, CRLF otherwise (the Received line is converted to match).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Literal

_BLANK_LINE = re.compile(rb"\n\r?\n")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # all but tab
_CTL_STR = re.compile(r"[\x00-\x1f\x7f]")
_NOT_HOST = re.compile(r"[^A-Za-z0-9.:_\[\]-]")
_NOT_ADDR = re.compile(r"[\x00-\x20\x7f<>]")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_ATEXT = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
) | frozenset(range(0x80, 0x100))  # RFC 6532: UTF-8 is allowed in atoms
_TOKEN = re.compile(  # the lexical tokens of an address list (comments nest one level)
    rb"""(?P<ws>[ \t]+)
    | (?P<quoted>"(?:[^"\\]|\\.)*")
    | (?P<comment>\((?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*\))
    | (?P<angle><[^>]*>?)
    | (?P<special>[,:;])
    | (?P<atom>[^ \t"(<,:;]+)
    | (?P<bad>.+)  # an unterminated quoted string or comment""",
    re.X | re.S,
)
_HELO_LIMIT = 255
_ADDR_LIMIT = 320

Token = tuple[str, int, int]  # kind, start, end


@dataclass(slots=True)
class _Field:
    """One header field of the header block: its lowercased name and byte range."""

    name: bytes  # b"" for a line that is not a header
    start: int
    end: int  # after the line ending of its last line
    value_start: int  # after the colon


def _header_end(data: bytes | bytearray) -> int:
    """Offset where the header block ends (the empty line, or the end of data)."""
    if data.startswith((b"\n", b"\r\n")):
        return 0
    m = _BLANK_LINE.search(data)
    return len(data) if m is None else m.start() + 1


def _newline(data: bytes | bytearray) -> bytes:
    i = data.find(b"\n")
    return b"\n" if i == 0 or (i > 0 and data[i - 1] != 0x0D) else b"\r\n"


def _fields(block: bytes) -> list[_Field]:
    """Split a header block into fields; continuation lines join the field above."""
    fields: list[_Field] = []
    pos, size = 0, len(block)
    while pos < size:
        nl = block.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        if block[pos] in b" \t" and fields:
            fields[-1].end = end
        else:
            colon = block.find(b":", pos, end)
            name = block[pos:colon].rstrip(b" \t").lower() if colon >= 0 else b""
            fields.append(_Field(name, pos, end, colon + 1 if colon >= 0 else pos))
        pos = end
    return fields


def _split_value(block: bytes, field: _Field) -> tuple[bytes, bytes]:
    """A field's raw value (folding kept) and its final line ending (maybe empty)."""
    raw = block[field.value_start : field.end]
    ending = b"\r\n" if raw.endswith(b"\r\n") else b"\n" if raw.endswith(b"\n") else b""
    return raw[: len(raw) - len(ending)], ending


def _one_line(value: bytes) -> bytes:
    """Unfold and turn control bytes but tab into spaces: the result cannot start a line."""
    return _CTL.sub(b" ", value.replace(b"\r\n", b"").replace(b"\n", b""))


def _quote(text: bytes) -> bytes:
    return b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _phrase(v: bytes, tokens: list[Token]) -> bytes | None:
    """The display name as written when it is a valid phrase, else re-quoted."""
    words = [t for t in tokens if t[0] != "ws"]
    if not words:
        return None
    written = v[words[0][1] : words[-1][2]]
    if all(
        kind in ("quoted", "comment") or (kind == "atom" and all(b in _ATEXT for b in v[s:e]))
        for kind, s, e in words
    ):
        return written
    text = b"".join(
        re.sub(rb"\\(.)", rb"\1", v[s + 1 : e - 1], flags=re.S) if kind == "quoted" else v[s:e]
        for kind, s, e in tokens[tokens.index(words[0]) : tokens.index(words[-1]) + 1]
    )
    return _quote(text)


def _display_name(value: bytes) -> bytes | None:
    """Display name of the first mailbox in an address list, None when it has none."""
    v = _one_line(value)
    pending: list[Token] = []
    for m in _TOKEN.finditer(v):
        kind, s, e = m.lastgroup or "bad", m.start(), m.end()
        if kind == "angle":
            return _phrase(v, pending)
        if kind == "special":
            if v[s] != 0x3A and any(t[0] not in ("ws", "comment") for t in pending):
                return None  # an addr-spec mailbox ended: it has no display name
            pending = []  # a group's name, or an empty list element
            continue
        pending.append((kind, s, e))
    return None


def _new_from(block: bytes, field: _Field, address: bytes, add_reply_to: bool,
              nl: bytes) -> bytes:
    """The From: line (plus Reply-To: when wanted) that replaces `field`."""
    value, ending = _split_value(block, field)
    name = _display_name(value)
    lines = [b"From: " + (address if name is None else name + b" <" + address + b">")]
    if add_reply_to and value.strip(b" \t\r\n"):
        lines.append(b"Reply-To:" + value)
    return nl.join(lines) + ending


def rewrite_message(
    data: bytes | bytearray, *, system_address: str, from_header: Literal["rewrite", "keep"],
    received: bytes, message_id: str, date: str,
) -> bytes:
    """Return `data` with the Received line first and the sender headers rewritten.

    An empty `system_address` is allowed with "keep" only, and then no From: is added;
    with "rewrite" it raises ValueError.
    """
    return b"".join(rewrite_parts(data, system_address=system_address, from_header=from_header,
                                  received=received, message_id=message_id, date=date))


def rewrite_parts(
    data: bytes | bytearray, *, system_address: str, from_header: Literal["rewrite", "keep"],
    received: bytes, message_id: str, date: str,
) -> list[bytes | memoryview]:
    """`rewrite_message` as pieces, the body a view into `data`: nothing is copied."""
    if from_header == "rewrite" and not system_address:
        raise ValueError("from_header='rewrite' needs a system address")
    end = _header_end(data)
    block = bytes(data[:end])
    nl = _newline(data)
    fields = _fields(block)
    names = {f.name for f in fields}
    address = _one_line(system_address.encode())
    out: list[bytes | memoryview] = [received.replace(b"\r\n", nl)]
    from_field = next((f for f in fields if f.name == b"from"), None)
    if from_header == "rewrite" and from_field is not None:
        out += [block[: from_field.start],
                _new_from(block, from_field, address, b"reply-to" not in names, nl),
                block[from_field.end :]]
    else:
        out.append(block)
    added = [b"From: " + address] if from_field is None and address else []
    if b"date" not in names:
        added.append(b"Date: " + _one_line(date.encode()))
    if b"message-id" not in names:
        added.append(b"Message-ID: " + _one_line(message_id.encode()))
    if block and not block.endswith(b"\n"):  # unterminated last line (no body): keep it so
        out += [nl + line for line in added]
    else:
        out += [line + nl for line in added]
    out.append(memoryview(data)[end:])
    return out


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


def _word_bytes(encoding: str, payload: str) -> bytes:
    raw = payload.encode("ascii", "replace")
    if encoding in "Qq":
        return binascii.a2b_qp(raw, header=True)
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4))
    except binascii.Error:
        return raw


def _to_text(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        return raw.decode("utf-8", "replace")


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words; adjacent words in one charset are joined first."""
    out: list[str] = []
    pending, charset, pos = b"", "", 0
    for m in _ENCODED_WORD.finditer(text):
        gap = text[pos : m.start()]
        word_charset = m[1].split("*")[0].lower()
        if pos == 0 or gap.strip() or word_charset != charset:
            if charset:
                out.append(_to_text(pending, charset))
            out.append(gap if pos == 0 or gap.strip() else "")
            pending, charset = b"", word_charset
        pending += _word_bytes(m[2], m[3])
        pos = m.end()
    if charset:
        out.append(_to_text(pending, charset))
    out.append(text[pos:])
    return "".join(out)


def header_value(data: bytes | bytearray, name: str) -> str | None:
    """First `name` header, unfolded and RFC 2047 decoded, control characters as spaces.

    For logs: never raises on malformed input. None when the header is absent.
    """
    block = bytes(data[: _header_end(data)])
    key = name.strip().lower().encode("ascii", "replace")
    for field in _fields(block):
        if field.name == key:
            value, _ = _split_value(block, field)
            text = _decode_words(_one_line(value).decode("utf-8", "replace"))
            return _CTL_STR.sub(" ", text).strip()
    return None
