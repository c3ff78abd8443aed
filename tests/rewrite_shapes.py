"""Header shapes that the rewrite must handle, shared by the unit test (Python's `email`
parser as the oracle) and the end-to-end test through the test Postfix.

Each shape: the message as an application wrote it, the display name the single From
must carry (None: the bare system address), the addresses the added Reply-To must list
(None: the message had its own Reply-To, kept), and the body as a reader sees it.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage


@dataclass(frozen=True)
class Shape:
    id: str
    message: bytes
    name: str | None
    reply_to: tuple[str, ...] | None
    body: bytes = b"body\r\n"


_DM = b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <shape@app.example>\r\n"
_B = b"\r\nbody\r\n"

SHAPES: list[Shape] = [
    Shape("plain", b"From: App <app@a.example>\r\n" + _DM + _B, "App", ("app@a.example",)),
    Shape("duplicate-crlf", b"From: App <app@a.example>\r\nFrom: Director <dir@bank.example>\r\n"
          + _DM + _B, "App", ("app@a.example", "dir@bank.example")),
    Shape("duplicate-bare-cr", b"From: App <app@a.example>\rFrom: Director <dir@bank.example>\r\n"
          + _DM + _B, "App", ("app@a.example", "dir@bank.example")),
    Shape("duplicate-bare-lf", b"From: App <app@a.example>\nFrom: Director <dir@bank.example>\r\n"
          + _DM + _B, "App", ("app@a.example", "dir@bank.example")),
    Shape("duplicate-apart", b"From: a@a.example\r\nSubject: s\r\nTo: t@x.example\r\n"
          b"FROM: b@b.example\r\n" + _DM + _B, None, ("a@a.example", "b@b.example")),
    Shape("three-froms-mixed-endings", b"From: a@a.example\rfrom: b@b.example\nFrom: c@c.example"
          b"\r\n" + _DM + _B, None, ("a@a.example", "b@b.example", "c@c.example")),
    Shape("folded", b"From: Approval\r\n Service <app@a.example>\r\n" + _DM + _B,
          "Approval Service", ("app@a.example",)),
    Shape("folded-bare-cr", b"From: Approval\r Service\r\t<app@a.example>\r\n" + _DM + _B,
          "Approval Service", ("app@a.example",)),
    Shape("folded-bare-lf-message", (b"From: Approval\n Service <app@a.example>\nFrom: x@x.example"
          b"\n" + _DM + _B).replace(b"\r\n", b"\n"), "Approval Service",
          ("app@a.example", "x@x.example"), b"body\n"),
    Shape("space-before-colon", b"From : Spaced <sp@a.example>\r\n" + _DM + _B, "Spaced",
          ("sp@a.example",)),
    Shape("tab-before-colon-second", b"From: A <a@a.example>\r\nFrom\t: B <b@b.example>\r\n"
          + _DM + _B, "A", ("a@a.example", "b@b.example")),
    Shape("lowercase-names", b"from: low <low@a.example>\r\ndate: Mon, 01 Jan 2024 00:00:00 +0000"
          b"\r\nmessage-id: <m@a>\r\n" + _B, "low", ("low@a.example",)),
    Shape("group", b"From: Team: First <a@a.example>, b@b.example;\r\n" + _DM + _B, "First",
          ("a@a.example", "b@b.example")),
    Shape("empty-group", b"From: undisclosed-recipients:;\r\n" + _DM + _B, None, ()),
    Shape("several-mailboxes", b"From: First <a@a.example>, Second <b@b.example>\r\n" + _DM + _B,
          "First", ("a@a.example", "b@b.example")),
    Shape("comment", b"From: John Q. Public (Ops) <jq@a.example>\r\n" + _DM + _B,
          "John Q. Public", ("jq@a.example",)),
    Shape("comment-only-name", b"From: app@a.example (Old Style)\r\n" + _DM + _B, None,
          ("app@a.example",)),
    Shape("quoted-comma", b'From: "Doe, John" <jd@a.example>\r\n' + _DM + _B, "Doe, John",
          ("jd@a.example",)),
    Shape("encoded-word", b"From: =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <jm@a.example>\r\n" + _DM + _B,
          "J\u00fcrgen M\u00fcller", ("jm@a.example",)),
    Shape("encoded-word-q", b"From: =?ISO-8859-1?Q?Andr=E9_Pirard?= <ap@a.example>\r\n" + _DM
          + _B, "Andr\u00e9 Pirard", ("ap@a.example",)),
    Shape("eight-bit", b"From: J\xc3\xbcrgen <j8@a.example>\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n"
          + _DM + b"\r\nK\xc3\xa4se\r\n", "J\u00fcrgen", ("j8@a.example",), b"K\xc3\xa4se\r\n"),
    Shape("no-display-name", b"From: bare@a.example\r\n" + _DM + _B, None, ("bare@a.example",)),
    Shape("angle-only", b"From: <angle@a.example>\r\n" + _DM + _B, None, ("angle@a.example",)),
    Shape("reply-to-kept", b"From: A <a@a.example>\r\nReply-To: Desk <desk@a.example>\r\n"
          + _DM + _B, "A", None),
    Shape("sender", b"From: A <a@a.example>\r\nSender: Other <other@evil.example>\r\n" + _DM + _B,
          "A", ("a@a.example",)),
    Shape("resent", b"Resent-From: R <r@a.example>\r\nResent-Sender: RS <rs@a.example>\r\n"
          b"Resent-Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nFrom: A <a@a.example>\r\n" + _DM + _B,
          "A", ("a@a.example",)),
    Shape("sender-without-from", b"Sender: S <s@a.example>\r\n" + _DM + _B, None, ()),
    Shape("no-from", b"Subject: nothing\r\n" + _DM + _B, None, ()),
    Shape("no-headers", b"Hello world\r\n", None, (), b"Hello world\r\n"),
    Shape("no-headers-bare-lf", b"just a body\n", None, (), b"just a body\n"),
    Shape("empty-first-line", b"\r\nFrom: fake <fake@evil.example>\r\n", None, (),
          b"From: fake <fake@evil.example>\r\n"),
    Shape("body-without-empty-line", b"Subject: s\r\n" + _DM + b"Hello world\r\n", None, (),
          b"Hello world\r\n"),
    Shape("from-after-body-line", b"Subject: s\r\nnot a header\r\nFrom: late <l@evil.example>\r\n",
          None, (), b"not a header\r\nFrom: late <l@evil.example>\r\n"),
    Shape("crlf-in-quoted-name", b'From: "Joe\r\n Bcc: victim@x" <joe@a.example>\r\n' + _DM + _B,
          "Joe Bcc: victim@x", ("joe@a.example",)),
    Shape("from-without-value-then-from", b"From:\r\nFrom: B <b@b.example>\r\n" + _DM + _B, None,
          ("b@b.example",)),
    Shape("unterminated-last-from", _DM + b"From: A <a@a.example>", "A", ("a@a.example",), b""),
]


def as_sent(data: bytes) -> EmailMessage:
    """`data` parsed by Python's `email` (default policy) after every bare CR or LF became
    CRLF, as the relay's upstream path sends it."""
    wire = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    msg = email.message_from_bytes(wire, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg
