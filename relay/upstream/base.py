"""The network edge: what a delivery hands a message to.

`Upstream` is the one interface the scheduler knows. Implementations: the
built-in `local` outbox (relay.upstream.outbox) and SMTP servers. `deliver()` returns one
`Outcome` per recipient, or raises TemporaryFailure / PermanentFailure when the
whole message failed (connection, timeout, authentication, DATA refused).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from relay.errors import (
    AuthenticationFailure,
    DeliveryFailure,
    PermanentFailure,
    SaslError,
    TemporaryFailure,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from relay.spool.store import Envelope, Recipient


@dataclass(frozen=True)
class Outgoing:
    """One message to send: its envelope, the file with its bytes, the sender to announce.

    `data` holds the bytes to send when the message is not larger than
    spool.INLINE_BYTES and the upstream asked for them (`wants_data`) or the scheduler
    rewrote them: it reads them with the claim. Otherwise the bytes to send are `head`
    followed by the file `path` from `offset` on, which the upstream reads itself
    (`head` is the rewritten header block, empty for a message stored as it is sent;
    `offset` is past the spool entry's own header, `Spool.message_start`).
    """

    envelope: Envelope
    path: Path
    mail_from: str
    recipients: list[Recipient]
    data: bytes | None = None
    head: bytes = b""
    offset: int = 0


@dataclass(frozen=True)
class Outcome:
    """The upstream's answer for one recipient: accepted when `failure` is None."""

    recipient: str
    reply: str
    failure: DeliveryFailure | None = None


class Upstream(Protocol):
    name: str
    wants_data: bool
    """True: `deliver()` needs the message in memory, so `Outgoing.data` is filled."""

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        """Hand over one message; raise TemporaryFailure/PermanentFailure for all of it."""
        ...

    async def close(self) -> None:
        """Close idle sessions; called on reload and shutdown."""
        ...

    def not_before(self) -> float:
        """Epoch seconds before which nothing should be tried (rate limit, auth backoff); 0."""
        ...


# --- one place that turns what the server or the network did into our failures ---------

_HINTS: list[tuple[str, str]] = [
    ("5.7.30", "Exchange Online: basic authentication for SMTP is turned off for this tenant; "
               "use OAuth (servers.NAME.oauth) or ask the tenant admin"),
    ("5.7.139", "Exchange Online: SMTP AUTH is disabled for this mailbox or tenant "
                "(SmtpClientAuthenticationDisabled); enable it or use OAuth"),
    ("SendAsDenied", "the account may not send as this address: system_account.address must "
                     "be the authenticated account's own address (or one it may send as)"),
    ("SubmissionQuotaExceeded", "Exchange Online: this mailbox's sending quota (30 messages "
                                "a minute, 10,000 recipients a day) is used up; the message "
                                "stays queued and goes later. Set servers.NAME.rate_limit and "
                                "max_recipients_per_day to stay under it"),
    ("5.7.57", "the server wants authentication before accepting mail: configure "
               "servers.NAME.auth"),
    ("Must issue a STARTTLS", "the server requires encryption: set encryption = \"starttls\""),
    ("5.7.8 Username and Password not accepted",
     "Gmail refused the password: use an app password or OAuth (servers.NAME.oauth)"),
    ("5.7.0 Authentication Required", "the server requires SMTP authentication: configure "
                                      "servers.NAME.auth"),
    ("5.7.1 Client does not have permissions",
     "the account may not send as this address: check system_account.address"),
]
_TOO_MANY = ("too many", "4.5.3", "4.7.28", "rate limit", "4.7.500", "try again later, closing",
             "4.3.2 storedrv")
_QUOTA = ("submissionquotaexceeded",)
"""A 5xx that is the sender's quota, not a verdict on the message (Exchange Online's
"554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"): deferred,
and the server is given time, as for a 4xx that says "too many"."""


def explain(reply: str) -> str:
    """The server's reply, with what it means when it is a known provider reply."""
    for marker, hint in _HINTS:
        if marker in reply:
            return reply if f" -- {hint}" in reply else f"{reply} -- {hint}"
    return reply


def slow_down_requested(reply: str) -> bool:
    """A 4xx that asks the client to send less (rate limits, too many connections), or a
    5xx that is a sending quota (`over_quota`)."""
    text = reply.lower()
    return ((reply.startswith("4") and any(marker in text for marker in _TOO_MANY))
            or over_quota(reply))


def over_quota(reply: str) -> bool:
    """A 5xx that refuses the sender for now (its quota), not the message: deferred."""
    text = reply.lower()
    return any(marker in text for marker in _QUOTA)


def classify(error: BaseException, *, server: str, stage: str, timeout: float,
             section: str = "servers.NAME") -> DeliveryFailure:
    """Turn any aiosmtplib, TLS or socket error into TemporaryFailure or PermanentFailure.

    The text names what happened and, where a setting cures it, the key under `section`
    (`servers.NAME`) to change."""
    if isinstance(error, DeliveryFailure):
        return error
    if isinstance(error, SaslError):
        return AuthenticationFailure(f"{server}: {error}", stage=stage)
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        return AuthenticationFailure(
            f"{server} refused the login: {explain(_reply(error))}"
            + ("" if " -- " in explain(_reply(error)) else
               f"; check {section}.auth.username and the password (password_file)"),
            code=error.code, stage=stage)
    if isinstance(error, aiosmtplib.SMTPResponseException) and not 100 <= error.code < 600:
        # aiosmtplib's -1: a reply line that is not SMTP, or over its 8 KiB / 32 KiB caps
        return TemporaryFailure(
            f"{server} sent something that is not an SMTP reply to {stage} "
            f"({error.message.strip()[:120]}); the connection is closed and the message "
            "is tried again later", stage=stage)
    if isinstance(error, aiosmtplib.SMTPResponseException):
        reply = explain(_reply(error))
        text = f"{server} answered {reply} to {stage}"
        if _not_authorized(error, stage):
            return TemporaryFailure(
                f"{text} -- the server does not let this account send (5.7.x before DATA): "
                f"check {section}.auth or pop_before_smtp; the message stays "
                "queued", code=error.code, stage=stage)
        permanent = 500 <= error.code < 600 and not over_quota(reply)
        kind = PermanentFailure if permanent else TemporaryFailure
        return kind(text, code=error.code, stage=stage)
    if isinstance(error, aiosmtplib.SMTPConnectTimeoutError):
        if isinstance(error.__cause__, aiosmtplib.SMTPTimeoutError):
            return UpstreamTimeout(f"no greeting within {timeout:g} s from {server}: "
                                   "connected, but the server said nothing", stage=stage)
        return UpstreamTimeout(f"timeout after {timeout:g} s connecting to {server}", stage=stage)
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(f"timeout after {timeout:g} s waiting for the reply to {stage} "
                               f"from {server}", stage=stage)
    if isinstance(error, ssl.SSLCertVerificationError):
        if getattr(error, "verify_code", None) == _HOSTNAME_MISMATCH:
            fix = (f"set {section}.host to a name the certificate is for (the server's "
                   f"public name), or {section}.tls_verify = false (unsafe)")
        else:
            fix = (f"add its CA with {section}.ca_file = \"/path/to/ca.pem\", or check that "
                   f"{section}.host is the name in the certificate")
        return TemporaryFailure(
            f"the TLS certificate of {server} is not trusted: {error.verify_message}; {fix}",
            stage=stage)
    if isinstance(error, ssl.SSLError):
        return TemporaryFailure(f"TLS with {server} failed: {error.reason or error}", stage=stage)
    cause = error.__cause__
    if isinstance(cause, ConnectionRefusedError):
        return UpstreamUnreachable(f"{server} refused the connection: is the server running "
                                   f"and the port right? check {section}.host and port",
                                   stage=stage)
    if isinstance(cause, socket.gaierror):
        return UpstreamUnreachable(f"{server}: the host name does not resolve ({cause.strerror});"
                                   f" check {section}.host", stage=stage)
    if isinstance(cause, ssl.SSLError):
        return classify(cause, server=server, stage=stage, timeout=timeout, section=section)
    if isinstance(error, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected
                  | ConnectionError):
        return UpstreamUnreachable(f"{server}: {_strip_prefix(str(error))} (during {stage})",
                                   stage=stage)
    if isinstance(error, OSError):
        return UpstreamUnreachable(f"{server}: {error.strerror or error} (during {stage})",
                                   stage=stage)
    if isinstance(error, aiosmtplib.SMTPException):
        return TemporaryFailure(f"{server}: {error} (during {stage})", stage=stage)
    raise error


_HOSTNAME_MISMATCH = 62
"""X509_V_ERR_HOSTNAME_MISMATCH: the certificate is trusted but for another name."""


def _not_authorized(error: aiosmtplib.SMTPResponseException, stage: str) -> bool:
    """5.7.x at MAIL or RCPT: a refusal of our authorisation (relay denied, authentication
    required), which a configuration fix cures. Deferred, not dead-lettered."""
    return (500 <= error.code < 600 and stage in ("MAIL FROM", "RCPT TO")
            and error.message.lstrip().startswith("5.7."))


def _reply(error: aiosmtplib.SMTPResponseException) -> str:
    return f"{error.code} {error.message}".strip()


def _strip_prefix(text: str) -> str:
    return text.removeprefix("Error connecting to ")
