"""The intake's envelope policy, as aiosmtpd handler hooks (its documented interface).

EHLO advertises DSN and ENHANCEDSTATUSCODES; MAIL and RCPT take an address only
when it is local-part@domain, valid UTF-8 and within RFC 5321's lengths, keep the
DSN parameters (RFC 3461) with their case, and RCPT bounds the recipients per
message. `RCPT TO:<postmaster>` without a domain is taken (RFC 5321 4.5.1) for
queue.notify, else the system address. DATA is not a hook here: the protocol
streams it (relay.listener.protocol).
"""

from __future__ import annotations

from typing import Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.listener.addresses import (
    ADDRESS,
    KEPT_MAIL_OPTIONS,
    dsn_parameters,
    is_utf8,
    over_limits,
)
from relay.listener.aiosmtpd_internals import quick_hooks


class Policy(Protocol):
    """What the hooks need from the listener."""

    def max_recipients(self) -> int: ...

    def postmaster(self) -> str | None: ...

    def rejected(self, reason: str) -> None: ...


def raw_argument(server: SMTP) -> str | None:
    """The MAIL or RCPT argument as the client wrote it (RelaySMTP keeps it)."""
    raw: str | None = getattr(server, "raw_argument", None)
    return raw


@quick_hooks
class IntakeHandler:
    """aiosmtpd hooks: check the envelope (DATA is RelaySMTP.smtp_DATA's, which streams it)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """aiosmtpd's lines plus DSN and ENHANCEDSTATUSCODES (RFC 2034), as one reply:
        aiosmtpd writes each line it is given with a system call (and a TCP segment) of
        its own; the lines are the same."""
        session.host_name = hostname
        return ["\r\n".join([*responses[:-1], "250-DSN", "250-ENHANCEDSTATUSCODES",
                             responses[-1]])]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if address != "<>" and not ADDRESS.match(address):
            return f"553 5.1.7 Sender address {address!r} is not of the form local-part@domain"
        if not is_utf8(address):
            return "553 5.6.7 Sender address is not valid UTF-8"
        if address != "<>" and (too_long := over_limits(address)):
            return f"553 5.1.7 Sender address {too_long}"
        dsn = dsn_parameters(raw_argument(server), "MAIL")
        if dsn is None:
            return "501 5.5.4 Invalid RET or ENVID parameter (RFC 3461)"
        envelope.mail_from = address  # "<>" for the null sender: aiosmtpd needs it non-empty
        envelope.mail_options.extend(o for o in mail_options if o in KEPT_MAIL_OPTIONS)
        envelope.mail_options.extend(dsn)
        return "250 2.1.0 Sender OK (the system address will be the sender)"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        limit = self.policy.max_recipients()
        if len(envelope.rcpt_tos) >= limit:
            self.policy.rejected("recipients")
            return f"452 4.5.3 Too many recipients: at most {limit} per message, send the rest " \
                   "in another transaction"
        if address.lower() == "postmaster":  # RFC 5321 4.5.1: taken without a domain
            address = self.policy.postmaster() or address
        elif not ADDRESS.match(address):
            return f"553 5.1.3 Recipient address {address!r} is not of the form local-part@domain"
        if not is_utf8(address):
            return "553 5.6.7 Recipient address is not valid UTF-8"
        if too_long := over_limits(address):
            return f"553 5.1.3 Recipient address {too_long}"
        dsn = dsn_parameters(raw_argument(server), "RCPT")
        if dsn is None:
            return "501 5.5.4 Invalid NOTIFY or ORCPT parameter (RFC 3461)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(" ".join(dsn))  # one entry per recipient
        return "250 2.1.5 Recipient OK"
