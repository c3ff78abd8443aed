"""Pure: the message an HTTP API is given, so that exactly the envelope's recipients get it.

Microsoft Graph's `sendMail` (MIME) and the Gmail API's `messages.send` take no
envelope: they deliver to every address in the To, Cc and Bcc header fields. The
relay's contract is the envelope's (SMTP's) one: exactly the envelope's
recipients receive the message, nobody else. So, per request:

- To and Cc keep the addresses that are envelope recipients, with their display
  names; an address in them that is not an envelope recipient is taken out (a
  field left empty is removed);
- every original Bcc field is removed, and one Bcc field lists the envelope
  recipients that are not in the kept To and Cc (the services take Bcc out of
  what the other recipients see).

Addresses are compared without regard to case. Nothing else in the message
changes; its body is not read. Standard library only: it imports nothing of the
relay (like relay.rewrite).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses

_FIELDS = ("to", "cc", "bcc")
_FOLD_AT = 78
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True)
class Addressed:
    """What `address_for_api` did: the message to hand over, and who was moved."""

    data: bytes
    removed: list[str] = field(default_factory=list)
    """Header recipients taken out of To/Cc (not envelope recipients)."""
    bcc: list[str] = field(default_factory=list)
    """Envelope recipients put in the Bcc field (in no To/Cc field)."""


def address_for_api(data: bytes, recipients: Sequence[str]) -> Addressed:
    """The message with To, Cc and Bcc set so that the services deliver it to exactly
    `recipients` (the envelope's pending recipients), see the module docstring."""
    match = _HEADER_END.search(data)
    if match is None:  # a header block and no body
        eol = b"\n" if data.endswith(b"\n") and not data.endswith(b"\r\n") else b"\r\n"
        head, body = data if data.endswith(b"\n") or not data else data + eol, b""
    else:
        eol = b"\r\n" if data[match.start()] == 0x0D else b"\n"
        head, body = data[:match.start() + len(eol)], data[match.start() + len(eol):]
    wanted = _unique(recipients)
    envelope = {a.lower() for a in wanted}
    fields = _fields(head)
    kept: dict[str, list[tuple[str, str]]] = {"to": [], "cc": []}
    removed: list[str] = []
    for name, raw in fields:
        if name not in _FIELDS:
            continue
        value = raw.split(b":", 1)[1].decode("utf-8", "surrogateescape")
        value = re.sub(r"\r?\n(?=[ \t])", "", value)
        for display, address in getaddresses([value]):
            if not address:
                continue
            if name != "bcc" and address.lower() in envelope:
                kept[name].append((display, address))
            elif address.lower() not in envelope:
                removed.append(address)
    visible = {a.lower() for pairs in kept.values() for _, a in pairs}
    bcc = [a for a in wanted if a.lower() not in visible]
    out: list[bytes] = []
    written: set[str] = set()
    for name, raw in fields:
        if name not in _FIELDS:
            out.append(raw)
        elif name in kept and name not in written:
            written.add(name)
            if kept[name]:
                out.append(_field("To" if name == "to" else "Cc", kept[name], eol))
    if bcc:
        out.append(_field("Bcc", [("", a) for a in bcc], eol))
    return Addressed(b"".join(out) + body, _unique(removed), bcc)


def _fields(head: bytes) -> list[tuple[str, bytes]]:
    """The header block as (lower-case name, the field's raw bytes with its folding); a
    line that is not a field (nor a continuation) is kept as it is, nameless."""
    fields: list[tuple[str, bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
            continue
        found = _NAME.match(line)
        fields.append((found.group(1).decode("ascii").lower() if found else "", line))
    return fields


def _field(name: str, pairs: list[tuple[str, str]], eol: bytes) -> bytes:
    """One address field, folded between addresses when it would be long."""
    items = [_mailbox(display, address) for display, address in pairs]
    line = f"{name}: " + ", ".join(items)
    if len(line) > _FOLD_AT:
        line = f"{name}: " + ("," + eol.decode() + " ").join(items)
    return line.encode("utf-8", "surrogateescape") + eol


def _mailbox(display: str, address: str) -> str:
    if not display:
        return address
    if "=?" in display or not display.isascii():
        # an encoded word stays as written; a raw UTF-8 name (SMTPUTF8) is quoted
        if "=?" in display:
            return f"{display} <{address}>"
        return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'
    return formataddr((display, address))


def _unique(addresses: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    found = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            found.append(address)
    return found
