"""relay.upstream.recipients: the headers an HTTP API gets, so that exactly the envelope's
recipients receive the message (pure; no network)."""

from __future__ import annotations

from email import message_from_bytes
from email.utils import getaddresses

from relay.upstream.recipients import address_for_api


def fields(data: bytes, name: str) -> list[str]:
    return [a for _, a in getaddresses(message_from_bytes(data).get_all(name, []))]


def test_header_recipients_outside_the_envelope_are_left_out_and_envelope_only_ones_go_bcc(
        ) -> None:
    data = (b"From: a@apps.example.com\r\nTo: \"Doe, John\" <john@example.com>,\r\n"
            b" stranger@example.com\r\nCc: =?utf-8?q?J=C3=B6rg?= <jorg@example.com>\r\n"
            b"Bcc: secret@example.com\r\nSubject: s\r\n\r\nTo: body@example.com\r\n")
    done = address_for_api(data, ["JOHN@example.com", "jorg@example.com", "new@example.com"])
    assert done.data.endswith(b"\r\n\r\nTo: body@example.com\r\n")  # the body is untouched
    assert b'To: "Doe, John" <john@example.com>\r\n' in done.data
    assert b"Cc: =?utf-8?q?J=C3=B6rg?= <jorg@example.com>\r\n" in done.data
    assert fields(done.data, "Bcc") == ["new@example.com"]
    assert b"stranger" not in done.data and b"secret" not in done.data
    assert done.removed == ["stranger@example.com", "secret@example.com"]
    assert done.bcc == ["new@example.com"]


def test_a_bcc_recipient_in_the_envelope_stays_bcc_and_no_one_is_named_twice() -> None:
    data = b"To: a@example.com\r\nBcc: b@example.com, A@example.com\r\n\r\nx\r\n"
    done = address_for_api(data, ["a@example.com", "b@example.com", "B@example.com"])
    assert fields(done.data, "To") == ["a@example.com"]
    assert fields(done.data, "Bcc") == ["b@example.com"]


def test_a_field_left_empty_is_removed_and_the_rest_of_the_header_keeps_its_order() -> None:
    data = (b"Received: from x\n\tby y\nTo: gone@example.com\nSubject: s\n"
            b"Cc: kept@example.com\n\nbody\n")
    done = address_for_api(data, ["kept@example.com", "other@example.com"])
    assert done.data == (b"Received: from x\n\tby y\nSubject: s\nCc: kept@example.com\n"
                         b"Bcc: other@example.com\n\nbody\n")


def test_a_message_without_address_fields_gets_every_recipient_as_bcc() -> None:
    done = address_for_api(b"Subject: note\r\n\r\nhi\r\n", ["x@example.com", "y@example.com"])
    assert done.data == b"Subject: note\r\nBcc: x@example.com, y@example.com\r\n\r\nhi\r\n"


def test_a_long_list_is_folded_between_addresses() -> None:
    rcpts = [f"person{i}@example.com" for i in range(10)]
    done = address_for_api(b"To: " + ", ".join(rcpts).encode() + b"\r\n\r\nx", rcpts)
    head = done.data.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert fields(done.data, "To") == rcpts
