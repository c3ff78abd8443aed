"""What the listener takes in MAIL and RCPT: address rules and DSN parameters.

Pure functions on the command's text, no I/O: an address must be local-part@domain,
valid UTF-8 and within RFC 5321's lengths; DSN parameters (RFC 3461) are read from
the command line as the client wrote it and kept with their case. aiosmtpd refuses
parameters it does not know, so `without_dsn` gives it the command without them.
"""

from __future__ import annotations

import re

LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]+@[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]+$")
KEPT_MAIL_OPTIONS = ("BODY=8BITMIME", "SMTPUTF8")
_DSN = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}
_DSN_KEYS = frozenset(("RET", "ENVID", "NOTIFY", "ORCPT"))
_DSN_VALUE = {
    "RET": re.compile(r"^(FULL|HDRS)$", re.I),
    "ENVID": re.compile(r"^[\x21-\x7e]{1,100}$"),
    "NOTIFY": re.compile(r"^(NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*)$", re.I),
    "ORCPT": re.compile(r"^[A-Za-z0-9-]+;[\x21-\x7e]{1,500}$"),
}
_KEYWORD_AND_ADDRESS = re.compile(r"\s*\S+:\s*\S*")


def is_utf8(text: str) -> bool:
    """aiosmtpd keeps undecodable bytes as surrogates; such an address is no UTF-8 address."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dsn_parameters(raw: str | None, command: str) -> list[str] | None:
    """The DSN parameters (RFC 3461) of a raw MAIL or RCPT argument, case kept; None if bad.

    aiosmtpd upper-cases parameters and refuses the ones it does not know, so the
    relay reads these from the command line as the client wrote it.
    """
    if not raw or ">" not in raw:
        return []
    found: list[str] = []
    for param in raw.rsplit(">", 1)[1].split():
        key, _, value = param.partition("=")
        if key.upper() in _DSN[command]:
            if not _DSN_VALUE[key.upper()].match(value):
                return None
            found.append(f"{key.upper()}={value}")
    return found


def _is_dsn(param: str) -> bool:
    """A DSN parameter aiosmtpd would take as well formed (`KEY=` alone is a syntax error)."""
    key, eq, value = param.partition("=")
    return key.upper() in _DSN_KEYS and not (eq and not value)


def without_dsn(arg: str | None) -> str | None:
    """A MAIL or RCPT argument without its RET, ENVID, NOTIFY and ORCPT parameters, for
    aiosmtpd, which would refuse them (555); the handler reads them from the raw line."""
    if not arg:
        return arg
    cut = arg.find(">") + 1  # the address's end: a value (ORCPT's) may hold a '>' too
    if cut == 0:  # an address without angle brackets: parameters follow it
        m = _KEYWORD_AND_ADDRESS.match(arg)
        cut = m.end() if m else len(arg)
    params = arg[cut:].split()
    kept = [p for p in params if not _is_dsn(p)]
    if len(kept) == len(params):
        return arg
    return arg[:cut] + "".join(" " + p for p in kept)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(
    rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*")


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """`<local@domain> params` as (address, params) when it is the plain, common form
    (dot-atoms, no quotes, comments or routes): what aiosmtpd's parser would return,
    at a fraction of its cost. None: let the parser decide."""
    m = _PLAIN_ANGLE_ADDR.match(arg)
    if m is None or arg.startswith("(", m.end()):
        return None
    return m.group(1), arg[m.end():]


def over_limits(address: str) -> str | None:
    """What is too long in `address` (RFC 5321 4.5.3.1: local part 64 octets, domain 255),
    or None."""
    local, _, domain = address.rpartition("@")
    if (size := len(local.encode("utf-8"))) > LOCAL_PART_MAX:
        return f"has a local part of {size} octets: at most {LOCAL_PART_MAX} (RFC 5321 4.5.3.1.1)"
    if (size := len(domain.encode("utf-8"))) > DOMAIN_MAX:
        return f"has a domain of {size} octets: at most {DOMAIN_MAX} (RFC 5321 4.5.3.1.2)"
    return None
