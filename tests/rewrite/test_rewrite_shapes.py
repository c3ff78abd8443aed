"""Exactly one From leaves the relay, the system address, whatever shape the header had.

The oracle is Python's `email` parser with the default policy, reading the rewritten
message as the next server gets it: every bare CR and bare LF turned into CRLF, as the
relay's upstream path sends it. tests/integration/test_rewrite_postfix.py sends the same
shapes through the relay to the test Postfix, for a second, independent reading.
"""

from __future__ import annotations

import re

import pytest

from relay.rewrite import rewrite_message, split_header
from tests.rewrite_shapes import SHAPES, Shape, as_sent

SYSTEM = "notify@example.com"
RCVD = (b"Received: from app ([127.0.0.1])\r\n\tby relay (sysmail-relay) with ESMTP id Q1;"
        b"\r\n\tD\r\n")


def test_there_are_at_least_30_shapes_with_distinct_names() -> None:
    assert len({shape.id for shape in SHAPES}) == len(SHAPES) >= 30


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_rewritten_message_has_exactly_one_from_the_system_address(shape: Shape) -> None:
    out = rewrite_message(shape.message, system_address=SYSTEM, from_header="rewrite",
                          received=RCVD, message_id="<Q1@example.com>",
                          date="Tue, 02 Jan 2024 03:04:05 +0000")
    msg = as_sent(out)
    assert msg.defects == []
    (from_,) = msg.get_all("From") or []
    (mailbox,) = from_.addresses
    name = mailbox.display_name.encode("utf-8", "surrogateescape").decode()  # 8-bit as UTF-8
    assert (name, mailbox.addr_spec) == (shape.name or "", SYSTEM)
    for name in ("Sender", "Resent-From", "Resent-Sender"):
        assert msg.get_all(name) is None
    for name in ("Date", "Message-ID", "Received"):
        assert len(msg.get_all(name) or []) == 1
    reply_to = msg.get_all("Reply-To") or []
    if shape.reply_to is None:  # the message's own Reply-To is kept
        assert [str(h) for h in reply_to] == ["Desk <desk@a.example>"]
    else:
        assert tuple(a.addr_spec for h in reply_to for a in h.addresses) == shape.reply_to
    assert msg.get_payload(decode=True) == re.sub(rb"\r\n|\r|\n", b"\r\n", shape.body)



@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_a_prefix_decides_the_header_block_as_the_whole_message_does_or_asks_for_more(
        shape: Shape) -> None:
    # A large message's header block is read from its file a chunk at a time.
    whole = split_header(shape.message)
    assert whole is not None
    decided = 0
    for cut in range(len(shape.message) + 1):
        part = split_header(shape.message[:cut], complete=False)
        if part is not None:
            decided += 1
            assert (part.end, part.body_line, part.fields) == (whole.end, whole.body_line,
                                                               whole.fields), cut
    assert decided or whole.end == len(shape.message)  # a body settles it before its end
