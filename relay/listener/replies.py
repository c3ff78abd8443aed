"""The listener's replies: enhanced status codes and clearer words for aiosmtpd's own.

Pure functions and tables, no I/O. Every 2xx, 4xx and 5xx reply but the greeting
and EHLO's carries an enhanced status code (RFC 2034 and RFC 3463); aiosmtpd's
stock replies that name no reason get one (`STOCK`, `better`).
"""

from __future__ import annotations

import re

_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "220": "2.0.0", "250": "2.0.0", "252": "2.5.0",
    "421": "4.3.2", "451": "4.3.0", "452": "4.5.3", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "550": "5.1.1", "552": "5.3.4", "553": "5.1.3", "554": "5.7.1",
    "555": "5.5.4",
}

AUTH_NOT_OFFERED = "502 5.5.1 AUTH not offered: this relay takes mail without authentication"
SHUTTING_DOWN = b"421 4.3.2 The relay is shutting down\r\n"

STOCK = {
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
}
"""aiosmtpd's stock replies, as the relay gives them."""


def with_enhanced_codes(reply: str) -> str:
    """Every 2xx, 4xx and 5xx line of `reply` with an enhanced status code (RFC 2034 and
    RFC 3463): the one it has, or the usual one for its reply code."""
    lines = reply.split("\r\n")
    for i, line in enumerate(lines):
        code = line[:3]
        if line[:1] not in "245" or not code.isdigit() or _ENHANCED.match(line):
            continue
        enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
        lines[i] = f"{line[:4]}{enhanced} {line[4:]}".rstrip(" ")
    return "\r\n".join(lines)


def too_big(limit: int) -> str:
    return f"552 5.3.4 Message too big: this relay accepts at most {limit} bytes"


def line_too_long(limit: int) -> str:
    return f"500 5.5.2 Line too long: this relay accepts lines of up to {limit} octets"
