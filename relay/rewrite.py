"""Rewrite a message's bytes so that the system address becomes its sender.

Pure: the client's bytes and the account's values in, the bytes to send out. Only
the header block is parsed; every other byte (body, the other header fields, their
order, folding, line endings, 8-bit content, a missing final line ending) is kept.

The header block is split the way receiving servers split it (and the way the
relay's own upstream path sends it, every line ending as CRLF): CRLF, a bare CR and
a bare LF each end a line; a line starting with space or tab continues the field
above; a field line is a name of printable ASCII (RFC 5322 ftext), optional blanks
(obsolete syntax: ``From :``) and a colon. The block ends at the first empty line,
or at the first other line: that line starts the body (a message without any header,
``Hello world``, is all body).

The edits, all in the header block:

- the Received trace line (see `received_header`) goes first;
- ``from_header="rewrite"``: every From field is removed, and at the place of the
  first one goes exactly one From line: the display name of the first mailbox of the
  first From field (as written, quoted only when it must be) before the system
  address, or the bare system address when it has none. When the message has no
  Reply-To, one follows it with the original senders: the values of every From
  field, folding kept, joined by commas. Sender, Resent-From and Resent-Sender are
  removed too: they name someone other than the system account (a spoofing signal
  next to its From, and Exchange refuses a Sender the account does not own);
- ``from_header="keep"``: no field is changed or removed;
- From (when there is none), Date and Message-ID (when missing) are added at the end
  of the header block, and when the body started with a line that is not a header
  field (not an empty line), an empty line follows them.

Added lines use the message's own line ending: bare LF when its first line ends in a
bare LF, CRLF otherwise (the Received line is converted to match). Nothing the rewrite
writes can start a new field: values it copies are unfolded or keep only their own
folds, and control characters become spaces.

Every function here is linear in the size of its input.
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
from typing import Literal, TypedDict

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # ftext, obsolete blanks, colon
_NAME_SO_FAR = re.compile(rb"[!-9;-~]*[ \t]*")  # what may still become a field name
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
VALUE_LIMIT = 16384
"""How much of a header field's value `header_value` decodes."""
_SENDER_FIELDS = frozenset((b"from", b"sender", b"resent-from", b"resent-sender"))
"""Removed by from_header="rewrite" (a From line for the system address replaces them)."""

Token = tuple[str, int, int]  # kind, start, end


class RewriteArguments(TypedDict):
    """The account's and the entry's values a rewrite takes (`rewrite_message(data, **a)`)."""

    system_address: str
    from_header: Literal["rewrite", "keep"]
    received: bytes
    message_id: str
    date: str


@dataclass(slots=True)
class _Field:
    """One header field: its lowercased name and byte range."""

    name: bytes
    start: int
    end: int  # after the line ending of its last line
    value_start: int  # after the colon


@dataclass(slots=True)
class Header:
    """Where the header block of a message is, and its fields."""

    fields: list[_Field]
    end: int
    """Offset of the first byte after the block: the empty line, the first line of the
    body, or the end of the message."""
    body_line: bool
    """The block ended at a line that is not a header field (not an empty line)."""


def split_header(data: bytes | bytearray, *, complete: bool = True) -> Header | None:
    """Split the header block of `data` into fields, as receiving servers do.

    `complete`: `data` is the whole message. Otherwise it is a prefix, and None means
    that the prefix does not yet show where the header block ends (read more).
    """
    fields: list[_Field] = []
    pos, size = 0, len(data)
    cr = lf = -1  # the next CR and LF at or after pos (size: none); each byte is seen once
    while pos < size:
        if cr < pos:
            cr = data.find(b"\r", pos) % (size + 1)
        if lf < pos:
            lf = data.find(b"\n", pos) % (size + 1)
        line_end = min(cr, lf)
        terminated = line_end < size
        end = line_end + (2 if lf == cr + 1 else 1) if terminated else size
        if line_end == pos:
            return Header(fields, pos, False)
        if data[pos] in b" \t":
            if not fields:
                return Header(fields, pos, True)
            if not complete and end == size:
                return None  # more of this field may follow
            fields[-1].end = end
        else:
            name = _FIELD_NAME.match(data, pos, line_end)
            if name is None:
                if not complete and not terminated and _NAME_SO_FAR.fullmatch(data, pos, size):
                    return None  # the rest of the line may make it a field
                return Header(fields, pos, True)
            if not complete and end == size:
                return None  # a CR's LF, or a continuation line, may follow
            fields.append(_Field(bytes(data[pos : name.end() - 1]).rstrip(b" \t").lower(), pos,
                                 end, name.end()))
        pos = end
    return Header(fields, size, False) if complete else None


def _newline(data: bytes | bytearray) -> bytes:
    i = data.find(b"\n")
    return b"\n" if i == 0 or (i > 0 and data[i - 1] != 0x0D) else b"\r\n"


def _value(data: bytes | bytearray, field: _Field) -> bytes:
    """A field's raw value, folds kept, without its final line ending."""
    raw = bytes(data[field.value_start : field.end])
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    return raw[:-1] if raw.endswith((b"\r", b"\n")) else raw


def _one_line(value: bytes) -> bytes:
    """Unfold and turn control bytes but tab into spaces: the result cannot start a line."""
    return _CTL.sub(b" ", _LINE_END.sub(b"", value))


def _quote(text: bytes) -> bytes:
    return b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _phrase(v: bytes, tokens: list[Token]) -> bytes | None:
    """The display name as written when it is a valid phrase, else re-quoted."""
    first = next((i for i, t in enumerate(tokens) if t[0] != "ws"), None)
    if first is None:
        return None
    last = max(i for i, t in enumerate(tokens) if t[0] != "ws")
    words = [t for t in tokens[first : last + 1] if t[0] != "ws"]
    if all(
        kind in ("quoted", "comment") or (kind == "atom" and all(b in _ATEXT for b in v[s:e]))
        for kind, s, e in words
    ):
        return v[tokens[first][1] : tokens[last][2]]
    return _quote(b"".join(
        re.sub(rb"\\(.)", rb"\1", v[s + 1 : e - 1], flags=re.S) if kind == "quoted" else v[s:e]
        for kind, s, e in tokens[first : last + 1]
    ))


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


def _sender_lines(data: bytes | bytearray, froms: list[_Field], address: bytes,
                  reply_to: bool, nl: bytes) -> list[bytes]:
    """The one From line (and the Reply-To line) that replace every sender field."""
    name = _display_name(_value(data, froms[0]))
    lines = [b"From: " + (address if name is None else name + b" <" + address + b">") + nl]
    originals = [v for v in (_value(data, f) for f in froms) if v.strip(b" \t\r\n")]
    if reply_to and originals:  # folds kept, each line ending the message's own
        lines.append(b"Reply-To:" + _LINE_END.sub(nl, b",".join(originals)) + nl)
    return lines


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
    """`rewrite_message` as two pieces, the new header block and a view of the rest."""
    head = rewrite_head(data, complete=True, system_address=system_address,
                        from_header=from_header, received=received, message_id=message_id,
                        date=date)
    assert head is not None  # a complete message always shows where its header block ends
    return [head[0], memoryview(data)[head[1]:]]


def rewrite_head(
    data: bytes | bytearray, *, complete: bool, system_address: str,
    from_header: Literal["rewrite", "keep"], received: bytes, message_id: str, date: str,
) -> tuple[bytes, int] | None:
    """The header block to send and the offset in `data` where the rest (sent as it is)
    starts; None when `data` is a prefix (`complete` false) too short to tell."""
    if from_header == "rewrite" and not system_address:
        raise ValueError("from_header='rewrite' needs a system address")
    header = split_header(data, complete=complete)
    if header is None:
        return None
    fields, end = header.fields, header.end
    nl = _newline(data)
    names = {f.name for f in fields}
    address = _one_line(system_address.encode())
    froms = [f for f in fields if f.name == b"from"]
    out: list[bytes] = [received.replace(b"\r\n", nl)]
    if from_header == "rewrite":
        kept = 0  # the start of the bytes not copied yet
        for field in fields:
            if field.name in _SENDER_FIELDS:
                out.append(bytes(data[kept : field.start]))
                if froms and field is froms[0]:
                    out += _sender_lines(data, froms, address, b"reply-to" not in names, nl)
                kept = field.end
        out.append(bytes(data[kept:end]))
    else:
        out.append(bytes(data[:end]))
    added = [b"From: " + address] if not froms and address else []
    if b"date" not in names:
        added.append(b"Date: " + _one_line(date.encode()))
    if b"message-id" not in names:
        added.append(b"Message-ID: " + _one_line(message_id.encode()))
    last = fields[-1] if fields else None
    if last is not None and last.end == end and not _LINE_END.search(data, end - 1, end) \
            and (from_header == "keep" or last.name not in _SENDER_FIELDS):
        out += [nl + line for line in added]  # an unterminated last line (no body): kept so
    else:
        out += [line + nl for line in added]
    if header.body_line:
        out.append(nl)
    return b"".join(out), end


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


def _to_text(raw: list[bytes], charset: str) -> str:
    joined = b"".join(raw)  # once per run of words: joining as they come is quadratic
    try:
        return joined.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        return joined.decode("utf-8", "replace")


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words; adjacent words in one charset are joined first."""
    out: list[str] = []
    pending: list[bytes] = []
    charset, pos = "", 0
    for m in _ENCODED_WORD.finditer(text):
        gap = text[pos : m.start()]
        word_charset = m[1].split("*")[0].lower()
        if pos == 0 or gap.strip() or word_charset != charset:
            if charset:
                out.append(_to_text(pending, charset))
            out.append(gap if pos == 0 or gap.strip() else "")
            pending, charset = [], word_charset
        pending.append(_word_bytes(m[2], m[3]))
        pos = m.end()
    if charset:
        out.append(_to_text(pending, charset))
    out.append(text[pos:])
    return "".join(out)


def header_value(data: bytes | bytearray, name: str) -> str | None:
    """First `name` header, unfolded and RFC 2047 decoded, control characters as spaces.

    For logs and the envelope: never raises on malformed input, and reads at most the
    first VALUE_LIMIT bytes of the value (a 24 MiB Subject is shown by its start). None
    when the header is absent.
    """
    key = name.strip().lower().encode("ascii", "replace")
    header = split_header(data)
    assert header is not None
    for field in header.fields:
        if field.name == key:
            field.end = min(field.end, field.value_start + VALUE_LIMIT)
            text = _decode_words(_one_line(_value(data, field)).decode("utf-8", "replace"))
            return _CTL_STR.sub(" ", text).strip()
    return None
