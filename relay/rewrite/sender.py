"""The edits of the header block that make the system address the sender.

- the Received trace line (relay.rewrite.trace) goes first;
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
folds, and control characters become spaces. Every other byte is kept.
"""

from __future__ import annotations

import re
from typing import Literal, TypedDict

from relay.rewrite.parse import LINE_END, Field, field_value, newline, one_line, split_header

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
    v = one_line(value)
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


def _sender_lines(data: bytes | bytearray, froms: list[Field], address: bytes,
                  reply_to: bool, nl: bytes) -> list[bytes]:
    """The one From line (and the Reply-To line) that replace every sender field."""
    name = _display_name(field_value(data, froms[0]))
    lines = [b"From: " + (address if name is None else name + b" <" + address + b">") + nl]
    originals = [v for v in (field_value(data, f) for f in froms) if v.strip(b" \t\r\n")]
    if reply_to and originals:  # folds kept, each line ending the message's own
        lines.append(b"Reply-To:" + LINE_END.sub(nl, b",".join(originals)) + nl)
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
    nl = newline(data)
    names = {f.name for f in fields}
    address = one_line(system_address.encode())
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
        added.append(b"Date: " + one_line(date.encode()))
    if b"message-id" not in names:
        added.append(b"Message-ID: " + one_line(message_id.encode()))
    last = fields[-1] if fields else None
    if last is not None and last.end == end and not LINE_END.search(data, end - 1, end) \
            and (from_header == "keep" or last.name not in _SENDER_FIELDS):
        out += [nl + line for line in added]  # an unterminated last line (no body): kept so
    else:
        out += [line + nl for line in added]
    if header.body_line:
        out.append(nl)
    return b"".join(out), end
