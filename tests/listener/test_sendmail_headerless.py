"""A message without headers, the usual cron case, gets its headers before its body.

`printf 'just a body\\n' | sysmail-sendmail ops@example.com` and the same through SMTP:
the delivered message has the added From, Date and Message-ID, an empty line, then
the body (before, the added lines came after the body and no reader saw a From).
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from pathlib import Path

import pytest

from tests.listener.test_sendmail_dropin import daemon, run_sendmail, the_message
from tests.support import Daemon

__all__ = ["daemon"]  # the fixture


@pytest.mark.parametrize("args", [(), ("-i",), ("-FCron Daemon",)])
def test_sendmail_body_without_headers_gets_headers_then_an_empty_line(
        daemon: Daemon, tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_sendmail(daemon, tmp_path, *args, "ops@example.com", stdin=b"just a body\n")
    assert result.returncode == 0, result.stderr
    _, data = the_message(tmp_path)
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator and body == b"just a body\r\n"
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.defects == []
    assert [a.addr_spec for a in msg["From"].addresses] == ["notify@example.com"]
    assert msg["Date"] and msg["Message-ID"]
    assert b"just a body" not in head


def test_smtp_message_without_headers_gets_headers_then_an_empty_line(
        daemon: Daemon, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.sendmail("app@example.com", ["ops@example.com"], b"Hello world\r\n")
    _, data = the_message(tmp_path)
    assert data.endswith(b">\r\n\r\nHello world\r\n")  # the Message-ID, the empty line, body
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.defects == [] and msg["From"] == "notify@example.com"
