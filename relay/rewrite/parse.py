"""The header block of a message, split the way receiving servers split it.

CRLF, a bare CR and a bare LF each end a line (the relay's own upstream path sends
every line ending as CRLF); a line starting with space or tab continues the field
above; a field line is a name of printable ASCII (RFC 5322 ftext), optional blanks
(obsolete syntax: ``From :``) and a colon. The block ends at the first empty line,
or at the first other line: that line starts the body (a message without any header,
``Hello world``, is all body). `field_value` and `one_line` take a field's value as
written, or unfolded with control characters as spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # ftext, obsolete blanks, colon
_NAME_SO_FAR = re.compile(rb"[!-9;-~]*[ \t]*")  # what may still become a field name
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # all but tab


@dataclass(slots=True)
class Field:
    """One header field: its lowercased name and byte range."""

    name: bytes
    start: int
    end: int  # after the line ending of its last line
    value_start: int  # after the colon


@dataclass(slots=True)
class Header:
    """Where the header block of a message is, and its fields."""

    fields: list[Field]
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
    fields: list[Field] = []
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
            fields.append(Field(bytes(data[pos : name.end() - 1]).rstrip(b" \t").lower(), pos,
                                 end, name.end()))
        pos = end
    return Header(fields, size, False) if complete else None


def newline(data: bytes | bytearray) -> bytes:
    i = data.find(b"\n")
    return b"\n" if i == 0 or (i > 0 and data[i - 1] != 0x0D) else b"\r\n"


def field_value(data: bytes | bytearray, field: Field) -> bytes:
    """A field's raw value, folds kept, without its final line ending."""
    raw = bytes(data[field.value_start : field.end])
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    return raw[:-1] if raw.endswith((b"\r", b"\n")) else raw


def one_line(value: bytes) -> bytes:
    """Unfold and turn control bytes but tab into spaces: the result cannot start a line."""
    return CTL.sub(b" ", LINE_END.sub(b"", value))
