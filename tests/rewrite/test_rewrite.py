"""The rewrite makes the system address the sender and changes no other byte.

Every rewrite test compares the whole output with the input plus exactly the lines
the rewrite is meant to change or add, so any other changed byte fails the test.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from types import FrameType

import pytest

from relay import rewrite as rewrite_module
from relay.rewrite import decode as rewrite_decode
from relay.rewrite import header_value, received_header, rewrite_message

SYSTEM = "notify@example.com"
RCVD = (b"Received: from app ([127.0.0.1])\r\n\tby relay (sysmail-relay) with ESMTP id Q1;"
        b"\r\n\tD\r\n")
DATE = "Tue, 02 Jan 2024 03:04:05 +0000"
MID = "<Q1@example.com>"
ADDED_DATE = b"Date: " + DATE.encode()
ADDED_MID = b"Message-ID: " + MID.encode()
HAS_DATE_AND_MID = b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <orig@app>\r\n"
BODY = b"\r\nHello,\r\n\r\nplease approve.\r\n"


def rewrite(data: bytes, mode: str = "rewrite", address: str = SYSTEM) -> bytes:
    assert mode in ("rewrite", "keep")
    return rewrite_message(data, system_address=address, from_header=mode,  # type: ignore[arg-type]
                           received=RCVD, message_id=MID, date=DATE)


# (case, the From: value as the application wrote it, the From: line the relay must write)
FROM_PAIRS: list[tuple[str, bytes, bytes]] = [
    ("plain", b" Approvals <app@host>", b"From: Approvals <notify@example.com>"),
    ("rfc2047-b", b" =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <app@host>",
     b"From: =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <notify@example.com>"),
    ("rfc2047-q", b" =?ISO-8859-1?Q?Andr=E9_Pirard?= <app@host>",
     b"From: =?ISO-8859-1?Q?Andr=E9_Pirard?= <notify@example.com>"),
    ("quoted-comma-escape", b' "Doe, John \\"JD\\"" <app@host>',
     b'From: "Doe, John \\"JD\\"" <notify@example.com>'),
    ("no-display-name", b" app@host", b"From: notify@example.com"),
    ("angle-addr-only", b" <app@host>", b"From: notify@example.com"),
    ("folded", b" Approval\r\n Service <app@host>", b"From: Approval Service <notify@example.com>"),
    ("folded-before-name", b"\r\n\tApprovals <app@host>", b"From: Approvals <notify@example.com>"),
    ("two-mailboxes", b" First <a@host>, Second <b@host>", b"From: First <notify@example.com>"),
    ("first-has-no-name", b" a@host, Second <b@host>", b"From: notify@example.com"),
    ("group", b" Team: First <a@host>, b@host;", b"From: First <notify@example.com>"),
    ("empty-group", b" undisclosed-recipients:;", b"From: notify@example.com"),
    ("dots-and-comment", b" John Q. Public (Ops) <app@host>",
     b"From: John Q. Public (Ops) <notify@example.com>"),
    ("utf8-raw", b" J\xc3\xbcrgen M\xc3\xbcller <app@host>",
     b"From: J\xc3\xbcrgen M\xc3\xbcller <notify@example.com>"),
    ("address-as-name-needs-quotes", b" joe@x.example <app@host>",
     b'From: "joe@x.example" <notify@example.com>'),
    ("brackets-need-quotes", b" Ops [EU] <app@host>", b'From: "Ops [EU]" <notify@example.com>'),
    ("backslash-escaped", b" Back\\slash <app@host>",
     b'From: "Back\\\\slash" <notify@example.com>'),
    ("comment-name-dropped", b" app@host (Old Style)", b"From: notify@example.com"),
]
FROM_CASES = [pytest.param(value, new_from, id=case) for case, value, new_from in FROM_PAIRS]


@pytest.mark.parametrize(("value", "new_from"), FROM_CASES)
def test_rewrite_replaces_from_in_place_and_adds_original_as_reply_to(
        value: bytes, new_from: bytes) -> None:
    msg = b"Subject: hello\r\nFrom:" + value + b"\r\nTo: boss@host\r\n" + HAS_DATE_AND_MID + BODY
    expected = (RCVD + b"Subject: hello\r\n" + new_from + b"\r\nReply-To:" + value
                + b"\r\nTo: boss@host\r\n" + HAS_DATE_AND_MID + BODY)
    assert rewrite(msg) == expected


@pytest.mark.parametrize(("value", "new_from"), FROM_CASES)
def test_keep_mode_leaves_from_untouched(value: bytes, new_from: bytes) -> None:
    msg = b"From:" + value + b"\r\nSubject: hello\r\n" + HAS_DATE_AND_MID + BODY
    assert rewrite(msg, "keep") == RCVD + msg


def test_rewrite_keeps_existing_reply_to() -> None:
    msg = b"From: App <app@host>\r\nreply-to: Desk <desk@host>\r\n" + HAS_DATE_AND_MID + BODY
    expected = (RCVD + b"From: App <notify@example.com>\r\nreply-to: Desk <desk@host>\r\n"
                + HAS_DATE_AND_MID + BODY)
    assert rewrite(msg) == expected


def test_every_from_field_is_replaced_by_one_from_and_all_senders_go_to_reply_to() -> None:
    msg = (b"From: A <a@host>\r\nSubject: hi\r\nFrom: B <b@host>, c@host\r\n"
           + HAS_DATE_AND_MID + BODY)
    expected = (RCVD + b"From: A <notify@example.com>\r\nReply-To: A <a@host>, B <b@host>, "
                b"c@host\r\nSubject: hi\r\n" + HAS_DATE_AND_MID + BODY)
    assert rewrite(msg) == expected


@pytest.mark.parametrize("separator", [b"\r\n", b"\r", b"\n"])
def test_second_from_after_any_line_ending_is_removed(separator: bytes) -> None:
    msg = (b"From: App <app@a.example>" + separator + b"From: Director <director@bank.example>"
           b"\r\n" + HAS_DATE_AND_MID + BODY)
    nl = b"\n" if separator == b"\n" else b"\r\n"  # added lines end as the first line does
    expected = (RCVD.replace(b"\r\n", nl) + b"From: App <notify@example.com>" + nl
                + b"Reply-To: App <app@a.example>, Director <director@bank.example>" + nl
                + HAS_DATE_AND_MID + BODY)
    assert rewrite(msg) == expected


def test_folded_from_values_keep_their_folds_in_reply_to_with_the_messages_line_ending() -> None:
    msg = (b"From: A\r <a@host>\nFrom: B\n\t<b@host>\n" + HAS_DATE_AND_MID.replace(b"\r", b"")
           + b"\nx")
    out = rewrite(msg)
    assert b"\nFrom: A <notify@example.com>\nReply-To: A\n <a@host>, B\n\t<b@host>\nDate" in out


@pytest.mark.parametrize("name", [b"Sender", b"Resent-From", b"Resent-Sender", b"sender ",
                                  b"RESENT-FROM"])
def test_rewrite_removes_fields_that_name_another_sender(name: bytes) -> None:
    msg = (b"From: A <a@host>\r\n" + name + b": Other <other@host>\r\n folded\r\n"
           b"Resent-Date: x\r\n" + HAS_DATE_AND_MID + BODY)
    expected = (RCVD + b"From: A <notify@example.com>\r\nReply-To: A <a@host>\r\n"
                b"Resent-Date: x\r\n" + HAS_DATE_AND_MID + BODY)
    assert rewrite(msg) == expected


def test_rewrite_removes_sender_also_when_there_is_no_from() -> None:
    msg = b"Sender: Other <other@host>\r\n" + HAS_DATE_AND_MID + BODY
    assert rewrite(msg) == RCVD + HAS_DATE_AND_MID + b"From: notify@example.com\r\n" + BODY


def test_keep_mode_keeps_every_sender_field() -> None:
    msg = (b"From: A <a@host>\r\nFrom: B <b@host>\r\nSender: S <s@host>\r\n"
           b"Resent-From: R <r@host>\r\n" + HAS_DATE_AND_MID + BODY)
    assert rewrite(msg, "keep") == RCVD + msg


def test_rewrite_of_empty_from_adds_no_empty_reply_to() -> None:
    msg = b"From: \r\n" + HAS_DATE_AND_MID + BODY
    assert rewrite(msg) == RCVD + b"From: notify@example.com\r\n" + HAS_DATE_AND_MID + BODY


@pytest.mark.parametrize("mode", ["rewrite", "keep"])
def test_missing_from_is_added_at_end_of_header_block(mode: str) -> None:
    msg = b"Subject: hi\r\n" + HAS_DATE_AND_MID + BODY
    expected = RCVD + b"Subject: hi\r\n" + HAS_DATE_AND_MID + b"From: notify@example.com\r\n" + BODY
    assert rewrite(msg, mode) == expected


def test_keep_mode_without_system_address_adds_no_from() -> None:
    msg = b"Subject: hi\r\n" + HAS_DATE_AND_MID + BODY
    assert rewrite(msg, "keep", address="") == RCVD + msg


def test_rewrite_mode_without_system_address_is_refused() -> None:
    with pytest.raises(ValueError, match="system address"):
        rewrite(b"From: a@host\r\n\r\nx", "rewrite", address="")


@pytest.mark.parametrize(("date", "mid"), [
    (b"Date: x", b"Message-ID: <a@b>"),
    (b"DATE: x", b"MESSAGE-ID: <a@b>"),
    (b"date: x", b"message-id: <a@b>"),
    (b"Date : x", b"Message-Id:<a@b>"),
])
def test_existing_date_and_message_id_are_kept_whatever_their_case(date: bytes, mid: bytes) -> None:
    msg = b"From: a@host\r\n" + date + b"\r\n" + mid + b"\r\n" + BODY
    assert rewrite(msg, "keep") == RCVD + msg


def test_missing_date_and_message_id_are_added_at_end_of_header_block() -> None:
    msg = b"From: a@host\r\nSubject: hi\r\n" + BODY
    expected = (RCVD + b"From: a@host\r\nSubject: hi\r\n" + ADDED_DATE + b"\r\n" + ADDED_MID
                + b"\r\n" + BODY)
    assert rewrite(msg, "keep") == expected


def test_lookalike_header_names_do_not_count_as_date_or_message_id() -> None:
    msg = b"From: a@host\r\nX-Date: x\r\nResent-Message-ID: <r@h>\r\n" + BODY
    expected = (RCVD + b"From: a@host\r\nX-Date: x\r\nResent-Message-ID: <r@h>\r\n" + ADDED_DATE
                + b"\r\n" + ADDED_MID + b"\r\n" + BODY)
    assert rewrite(msg, "keep") == expected


def test_bare_lf_message_gets_bare_lf_lines() -> None:
    msg = b"From: App <app@host>\nSubject: hi\n\nbody\nline\n"
    expected = (RCVD.replace(b"\r\n", b"\n") + b"From: App <notify@example.com>\n"
                b"Reply-To: App <app@host>\nSubject: hi\n" + ADDED_DATE + b"\n" + ADDED_MID
                + b"\n\nbody\nline\n")
    assert rewrite(msg) == expected


def test_crlf_headers_with_bare_lf_in_body_keep_the_body_as_is() -> None:
    msg = b"Subject: hi\r\n" + HAS_DATE_AND_MID + b"\r\nline\nline\r\r\nend"
    expected = (RCVD + b"Subject: hi\r\n" + HAS_DATE_AND_MID + b"From: notify@example.com\r\n"
                b"\r\nline\nline\r\r\nend")
    assert rewrite(msg) == expected


def test_message_without_body_gets_lines_after_its_last_header() -> None:
    msg = b"From: A <a@host>\r\nSubject: hi\r\n"
    expected = (RCVD + b"From: A <notify@example.com>\r\nReply-To: A <a@host>\r\nSubject: hi\r\n"
                + ADDED_DATE + b"\r\n" + ADDED_MID + b"\r\n")
    assert rewrite(msg) == expected


def test_unterminated_last_header_stays_without_final_line_ending() -> None:
    # aiosmtpd hands over "Subject: hi" for DATA "Subject: hi\r\n.\r\n"
    expected = (RCVD + b"Subject: hi\r\nFrom: notify@example.com\r\n" + ADDED_DATE + b"\r\n"
                + ADDED_MID)
    assert rewrite(b"Subject: hi") == expected


def test_unterminated_from_header_is_rewritten_into_whole_lines() -> None:
    msg = HAS_DATE_AND_MID + b"From: A <a@host>"
    expected = (RCVD + HAS_DATE_AND_MID + b"From: A <notify@example.com>\r\n"
                b"Reply-To: A <a@host>\r\n")
    assert rewrite(msg) == expected


def test_message_that_is_only_a_body_gets_headers_before_its_empty_line() -> None:
    msg = b"\r\nFrom: fake <fake@host>\r\nDate: not a header\r\n"
    expected = (RCVD + b"From: notify@example.com\r\n" + ADDED_DATE + b"\r\n" + ADDED_MID
                + b"\r\n" + msg)
    assert rewrite(msg) == expected


def test_empty_message_gets_only_the_added_headers() -> None:
    expected = (RCVD + b"From: notify@example.com\r\n" + ADDED_DATE + b"\r\n" + ADDED_MID
                + b"\r\n")
    assert rewrite(b"") == expected


def test_body_line_that_looks_like_a_header_is_not_touched() -> None:
    body = b"\r\nFrom: Evil <evil@host>\r\nReply-To: x\r\nMessage-ID: <x@y>\r\n"
    msg = b"Subject: hi\r\nDate: d\r\n" + body
    expected = (RCVD + b"Subject: hi\r\nDate: d\r\nFrom: notify@example.com\r\n" + ADDED_MID
                + b"\r\n" + body)
    assert rewrite(msg) == expected


def test_eight_bit_body_and_utf8_headers_are_kept_byte_for_byte() -> None:
    body = b"\r\nGr\xc3\xbc\xc3\x9fe \xff\xfe\x00\x80 latin-1 \xe9\r\n\xf0\x9f\x93\xa7"
    subject = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n"
    msg = subject + b"From: M\xc3\xbcller <m@h\xc3\xb6st>\r\n" + HAS_DATE_AND_MID + body
    expected = (RCVD + subject + b"From: M\xc3\xbcller <notify@example.com>\r\n"
                b"Reply-To: M\xc3\xbcller <m@h\xc3\xb6st>\r\n" + HAS_DATE_AND_MID + body)
    assert rewrite(msg) == expected


def test_dot_sequences_and_missing_final_crlf_in_body_are_kept() -> None:
    body = b"\r\n.\r\nline\n.\r\n..\r\n.\n\r\n.\r\nno final crlf"
    msg = b"From: a@host\r\n" + HAS_DATE_AND_MID + body
    assert rewrite(msg, "keep") == RCVD + msg


def test_header_block_ends_at_first_empty_line_and_keeps_odd_lines() -> None:
    msg = (b"X-Empty:\r\nX-Space:   \r\n  only-spaces-continuation\r\nX-Obs : old syntax\r\n"
           b"From: a@host\r\n" + HAS_DATE_AND_MID + b"\r\nX: body\r\n\r\nDate: body\r\n")
    assert rewrite(msg, "keep") == RCVD + msg


ADDED_ALL = b"From: notify@example.com\r\n" + ADDED_DATE + b"\r\n" + ADDED_MID + b"\r\n"


@pytest.mark.parametrize("mode", ["rewrite", "keep"])
@pytest.mark.parametrize("msg", [b"Hello world\r\n", b"Hello world", b"no colon: here\r\nx\r\n",
                                 b" starts with a blank\r\n", b"From sender Mon Jan 1\r\nx: y\r\n",
                                 b"8-bit\xc3\xa9: name\r\n", b":\r\n"])
def test_message_without_headers_gets_them_before_its_body_with_an_empty_line(
        mode: str, msg: bytes) -> None:
    assert rewrite(msg, mode) == RCVD + ADDED_ALL + b"\r\n" + msg


def test_sendmail_body_with_bare_lf_gets_headers_and_empty_line_in_bare_lf() -> None:
    expected = (RCVD.replace(b"\r\n", b"\n") + ADDED_ALL.replace(b"\r\n", b"\n") + b"\n"
                b"just a body\n")
    assert rewrite(b"just a body\n") == expected


def test_body_after_headers_without_empty_line_gets_one() -> None:
    msg = b"Subject: hi\r\n" + HAS_DATE_AND_MID + b"Hello world\r\n"
    expected = (RCVD + b"Subject: hi\r\n" + HAS_DATE_AND_MID + b"From: notify@example.com\r\n"
                b"\r\nHello world\r\n")
    assert rewrite(msg) == expected


@pytest.mark.parametrize(("value", "new_from"), [
    pytest.param(b' "Joe\r\n Bcc: victim@x" <app@host>',
                 b'From: "Joe Bcc: victim@x" <notify@example.com>', id="folded-crlf-in-name"),
    pytest.param(b" Jo\x00e <app@host>", b"From: Jo e <notify@example.com>", id="nul-in-name"),
    pytest.param(b" =?UTF-8?B?Sm9lDQpCY2M6IHZpY3RpbUB4?= <app@host>",
                 b"From: =?UTF-8?B?Sm9lDQpCY2M6IHZpY3RpbUB4?= <notify@example.com>",
                 id="crlf-inside-encoded-word-stays-encoded"),
])
def test_display_name_cannot_inject_a_header_line(value: bytes, new_from: bytes) -> None:
    msg = b"From:" + value + b"\r\n" + HAS_DATE_AND_MID + BODY
    out = rewrite(msg)
    assert out == RCVD + new_from + b"\r\nReply-To:" + value + b"\r\n" + HAS_DATE_AND_MID + BODY
    new_lines = out[len(RCVD):].split(b"\n")
    assert not [line for line in new_lines if line.startswith(b"Bcc")]


# --- the core promise, on random messages -----------------------------------------------

OTHER_NAMES = [b"Subject", b"To", b"Cc", b"X-Mailer", b"X-Date", b"Resent-Message-ID",
               b"Content-Type", b"X-From", b"Fromage", b"MIME-Version", b"Received"]
VALUE_BYTES = bytes(b for b in range(256) if b not in b"\r\n")
BODY_BYTES = b"\r\n.:From: Date\t \x00\xff\xc3\xa9"


def _random_field(rng: random.Random, nl: bytes) -> bytes:
    value = bytes(rng.choice(VALUE_BYTES) for _ in range(rng.randrange(40)))
    field = rng.choice(OTHER_NAMES) + b":" + value + nl
    for _ in range(rng.randrange(3)):
        field += rng.choice([b" ", b"\t"]) + value[: rng.randrange(20)] + nl
    return field


@pytest.mark.parametrize("seed", range(300))
def test_random_message_changes_only_the_edited_lines(seed: int) -> None:
    rng = random.Random(seed)
    nl = rng.choice([b"\r\n", b"\n"])
    mode = rng.choice(["rewrite", "keep"])
    fields = [_random_field(rng, nl) for _ in range(rng.randrange(8))]
    added: list[bytes] = []
    case = rng.choice([*FROM_PAIRS, None])
    if case is None:
        added.append(b"From: notify@example.com")
    else:
        value = case[1].replace(b"\r\n", nl)
        fields.insert(rng.randrange(len(fields) + 1), b"From:" + value + nl)
    for line, present in ((ADDED_DATE, b"DaTe: x" + nl), (ADDED_MID, b"message-ID: <m@h>" + nl)):
        if rng.random() < 0.5:
            fields.insert(rng.randrange(len(fields) + 1), present)
        else:
            added.append(line)
    body = nl + bytes(rng.choice(BODY_BYTES) for _ in range(rng.randrange(200)))
    msg = b"".join(fields) + body
    if mode == "rewrite" and case is not None:
        fields[fields.index(b"From:" + value + nl)] = case[2] + nl + b"Reply-To:" + value + nl
    expected = (RCVD.replace(b"\r\n", nl) + b"".join(fields) + b"".join(a + nl for a in added)
                + body)
    assert rewrite(msg, mode) == expected


def test_large_body_is_kept_byte_for_byte() -> None:
    body = b"\r\n" + bytes(range(256)) * (25 * 1024 * 1024 // 256)
    msg = b"From: A <a@host>\r\n" + HAS_DATE_AND_MID + body
    out = rewrite(msg)
    head = RCVD + b"From: A <notify@example.com>\r\nReply-To: A <a@host>\r\n" + HAS_DATE_AND_MID
    assert out[: len(head)] == head
    assert out[len(head):] == body


# --- received_header ----------------------------------------------------------------------

WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))


def received(helo: str | None = "app.example", recipients: tuple[str, ...] = ("boss@example.com",),
             peer_ip: str = "192.0.2.7", protocol: str = "ESMTP") -> bytes:
    return received_header(helo=helo, peer_ip=peer_ip, by_host="relay.example", queue_id="Q1",
                           recipients=recipients, when=WHEN, with_protocol=protocol)


def test_received_names_the_only_recipient() -> None:
    assert received() == (b"Received: from app.example ([192.0.2.7])\r\n"
                          b"\tby relay.example (sysmail-relay) with ESMTP id Q1\r\n"
                          b"\tfor <boss@example.com>; Tue, 02 Jan 2024 03:04:05 +0100\r\n")


@pytest.mark.parametrize("recipients", [(), ("a@example.com", "b@example.com")])
def test_received_names_no_recipient_unless_exactly_one(recipients: tuple[str, ...]) -> None:
    assert received(recipients=recipients) == (
        b"Received: from app.example ([192.0.2.7])\r\n"
        b"\tby relay.example (sysmail-relay) with ESMTP id Q1;\r\n"
        b"\tTue, 02 Jan 2024 03:04:05 +0100\r\n")


def test_received_without_helo_says_unknown_and_keeps_ipv6_and_protocol() -> None:
    out = received(helo=None, peer_ip="::1", protocol="UTF8SMTP")
    assert out.startswith(b"Received: from unknown ([::1])\r\n\tby relay.example (sysmail-relay)"
                          b" with UTF8SMTP id Q1\r\n")


@pytest.mark.parametrize(("helo", "shown"), [
    ("evil\r\nX-Injected: yes", b"evil??X-Injected:?yes"),
    ("a\x00b\tc (d)", b"a?b?c??d?"),
    ("", b"unknown"),
    ("h\xe9llo", b"h?llo"),
])
def test_received_sanitises_helo_to_one_line(helo: str, shown: bytes) -> None:
    out = received(helo=helo)
    assert out.startswith(b"Received: from " + shown + b" ([192.0.2.7])\r\n\tby ")
    assert out.count(b"\n") == 3 and out.count(b"\r") == 3


def test_received_bounds_a_long_helo() -> None:
    out = received(helo="a" * 5000)
    assert out.split(b"\r\n")[0] == b"Received: from " + b"a" * 255 + b" ([192.0.2.7])"


def test_received_sanitises_recipient() -> None:
    out = received(recipients=("boss@example.com>\r\nX-Injected: yes",))
    assert out.endswith(b"\tfor <boss@example.comX-Injected:yes>; "
                        b"Tue, 02 Jan 2024 03:04:05 +0100\r\n")
    assert out.count(b"\n") == 3


def test_received_header_is_accepted_by_rewrite_as_first_line() -> None:
    rcvd = received_header(helo="app", peer_ip="127.0.0.1", by_host="relay", queue_id="Q9",
                           recipients=["a@b"], when=datetime(2024, 1, 1, tzinfo=UTC))
    msg = b"From: a@host\r\n" + HAS_DATE_AND_MID + BODY
    out = rewrite_message(msg, system_address=SYSTEM, from_header="keep", received=rcvd,
                          message_id=MID, date=DATE)
    assert out == rcvd + msg


# --- header_value ---------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "expected"), [
    (b"Subject: Approval needed", "Approval needed"),
    (b"Subject: Approval\r\n needed\r\n\tnow", "Approval needed now"),
    (b"Subject: =?UTF-8?B?R3LDvMOfZQ==?=", "Gr\xfc\xdfe"),
    (b"Subject: =?iso-8859-1?q?caf=E9_cr=E8me?=", "caf\xe9 cr\xe8me"),
    (b"Subject: Re: =?UTF-8?Q?caf=C3=A9?= menu", "Re: caf\xe9 menu"),
    (b"Subject: =?UTF-8?B?R3LD?= \r\n =?UTF-8?B?vMOfZQ==?=", "Gr\xfc\xdfe"),
    (b"Subject: =?UTF-8?Q?a?= =?ISO-8859-1?Q?=E9?=", "a\xe9"),
    (b"Subject: Gr\xc3\xbc\xc3\x9fe raw", "Gr\xfc\xdfe raw"),
    (b"subject:no space", "no space"),
])
def test_header_value_unfolds_and_decodes(header: bytes, expected: str) -> None:
    assert header_value(header + b"\r\nTo: x\r\n\r\nbody", "Subject") == expected


@pytest.mark.parametrize(("header", "expected"), [
    (b"Subject: =?UTF-8?B?!!!?=", ""),
    (b"Subject: =?no-such-charset?Q?abc?=", "abc"),
    (b"Subject: =?idna?Q?abc?=", "abc"),
    (b"Subject: =?base64?Q?abc?=", "abc"),
    (b"Subject: \xff\xfe broken", "\ufffd\ufffd broken"),
    (b"Subject: a\x00b\r c", "a b c"),
    (b"Subject: a\x00b\rc: x", "a b"),
    (b"Subject: =?UTF-8?B?YQ0KQmNjOiB4?=", "a  Bcc: x"),
    (b"Subject: =?UTF-8?B?YWJj", "=?UTF-8?B?YWJj"),
])
def test_header_value_never_raises_on_garbage(header: bytes, expected: str) -> None:
    assert header_value(header + b"\r\n\r\n", "subject") == expected


def test_header_value_returns_first_occurrence_from_header_block_only() -> None:
    msg = b"From: A <a@host>\r\nSubject: first\r\nSubject: second\r\n\r\nX-Only-Body: yes\r\n"
    assert header_value(msg, "SUBJECT") == "first"
    assert header_value(msg, "X-Only-Body") is None
    assert header_value(msg, "Reply-To") is None
    assert header_value(b"\r\nSubject: body\r\n", "Subject") is None


# --- work is linear in the size of the message ---------------------------------------------

def _python_steps(call: Callable[[], object]) -> int:
    """How many lines of relay/rewrite/ run during `call` (an operation count)."""
    steps = 0
    package = os.path.dirname(rewrite_module.__file__) + os.sep

    def local(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal steps
        steps += event == "line"
        return local

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        return local if frame.f_code.co_filename.startswith(package) else None

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return steps


def _many(n: int) -> bytes:
    words = b" ".join([b"=?UTF-8?Q?caf=C3=A9?="] * n)
    mailboxes = b", ".join([b'"Doe, J" (c) <a@host>'] * n)
    return (b"Subject: " + words + b"\r\n" + b"".join(b"From: " + words + b" <a@host>, "
            + mailboxes + b"\r\nX-N: v\r\n folded\r\n" for _ in range(n)) + b"\r\nbody\r\n")


@pytest.mark.parametrize("work", ["rewrite", "keep", "header_value"])
def test_rewrite_and_header_value_work_grows_linearly_with_the_message(work: str) -> None:
    def run(msg: bytes) -> Callable[[], object]:
        if work == "header_value":
            return lambda: (header_value(msg, "Subject"), header_value(msg, "From"))
        return lambda: rewrite(msg, work)
    small, large = (_python_steps(run(_many(n))) for n in (50, 200))
    assert large <= 4.5 * small  # quadratic work would be 16 times


@pytest.mark.timeout(60)
def test_16_mib_of_encoded_words_are_decoded_in_one_pass() -> None:
    # Joining the decoded words as they came copied the text so far for each word: a
    # 24 MiB Subject froze the event loop for 52 s, 16 MiB would take minutes. Linear
    # work takes about a second here; the timeout fails the quadratic kind.
    word = "=?utf-8?q?" + "a" * 60 + "?= "
    count = 16 * 1024 * 1024 // len(word)
    assert rewrite_decode._decode_words(word * count) == "a" * 60 * count + " "


@pytest.mark.timeout(60)
def test_header_value_of_a_24_mib_subject_is_its_start() -> None:
    word = b"=?utf-8?q?" + b"a" * 60 + b"?= "
    subject = word * (24 * 1024 * 1024 // len(word))
    value = header_value(b"Subject: " + subject + b"\r\nTo: x\r\n\r\nbody", "Subject")
    assert value is not None and value.startswith("a" * 1000)
    assert len(value) <= rewrite_module.VALUE_LIMIT
