"""The MAIL and RCPT text rules: what aiosmtpd is given once the DSN parameters are
taken out (the handler reads those from the line as the client wrote it)."""

from __future__ import annotations

import pytest

from relay.listener.addresses import dsn_parameters, without_dsn


@pytest.mark.parametrize(("arg", "for_aiosmtpd"), [
    ("FROM:<a@example.com>", "FROM:<a@example.com>"),
    ("FROM:<a@example.com> RET=HDRS ENVID=Abc+2Bx", "FROM:<a@example.com>"),
    ("FROM:<a@example.com> ret=full SIZE=10 envid=x", "FROM:<a@example.com> SIZE=10"),
    ("FROM:a@example.com RET=FULL BODY=8BITMIME", "FROM:a@example.com BODY=8BITMIME"),
    ("FROM: a@example.com RET=FULL", "FROM: a@example.com"),
    ("TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@Example.com", "TO:<b@example.com>"),
    ("TO:<b@example.com> ORCPT=rfc822;a>b", "TO:<b@example.com>"),
    # `KEY=` alone stays, for aiosmtpd's syntax error as before
    ("FROM:<a@example.com> RET=", "FROM:<a@example.com> RET="),
    ("TO:<b@example.com> NOTIFY= FOO=bar", "TO:<b@example.com> NOTIFY= FOO=bar"),
    (None, None), ("", ""),
])
def test_dsn_parameters_are_taken_out_of_what_aiosmtpd_parses(
        arg: str | None, for_aiosmtpd: str | None) -> None:
    assert without_dsn(arg) == for_aiosmtpd


def test_the_handler_still_reads_them_from_the_raw_line() -> None:
    raw = "FROM:<a@example.com> ret=hdrs ENVID=Abc+2Bx SIZE=10"
    assert dsn_parameters(raw, "MAIL") == ["RET=hdrs", "ENVID=Abc+2Bx"]
    assert dsn_parameters("TO:<b@example.com> NOTIFY=NEVERMORE", "RCPT") is None
