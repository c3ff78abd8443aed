"""A header field's value for people: for logs, the envelope's Subject and the page.

`header_value` unfolds the first field of a name, decodes RFC 2047 encoded words
(adjacent words in one charset joined first, as RFC 2047 says) and turns control
characters into spaces. It never raises on malformed input, and reads at most the
first VALUE_LIMIT bytes of the value.
"""

from __future__ import annotations

import base64
import binascii
import re

from relay.rewrite.parse import field_value, one_line, split_header

_CTL_STR = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
VALUE_LIMIT = 16384
"""How much of a header field's value `header_value` decodes."""


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
            text = _decode_words(one_line(field_value(data, field)).decode("utf-8", "replace"))
            return _CTL_STR.sub(" ", text).strip()
    return None
