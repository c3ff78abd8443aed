"""One connection to a real SMTP server through aiosmtplib's public `SMTP` API.

`Session` opens the TCP connection itself (relay.upstream.network, so that a
connect timeout, a TLS handshake that never ends and a server that never greets
are told apart) and hands the socket to `SMTP.connect(sock=...)`, which reads the
banner; then `ehlo`, `starttls` (required when chosen), the login
(relay.upstream.smtp_login) and, per message, one transaction of `mail`, one
`rcpt` per recipient and `data`, each bounded by the server's timeout. A refused
transaction is reset (`rset`) before the session is used again. aiosmtplib sends
one command at a time (no PIPELINING): each message costs the round trips of
MAIL, every RCPT, DATA and its final dot.

A failure at any step becomes a TemporaryFailure or PermanentFailure (through
`upstream.classify`) whose text names the key to change. The pool that reuses
sessions is relay.upstream.smtp_pool; `check --connect` is relay.upstream.probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import TYPE_CHECKING

import aiosmtplib

from relay.errors import (
    DeliveryFailure,
    TemporaryFailure,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from relay.settings import ServerSettings
from relay.upstream.base import Outcome, Outgoing, classify
from relay.upstream.message import Body, eight_bit_refusal, mail_options
from relay.upstream.network import TlsContexts, tcp_connect, tls_context
from relay.upstream.smtp_login import PORTS, Login, Step, reply_text

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth


class Session(Login):
    """One connection to the server, opened, encrypted and authenticated."""

    def __init__(self, name: str, server: ServerSettings, hostname: str,
                 on_step: Step | None = None, oauth: OAuth | None = None,
                 contexts: TlsContexts | None = None) -> None:
        assert server.host is not None and server.port is not None
        self.name = name
        self.server = server
        self.oauth = oauth
        self.label = f"{name} ({server.host}:{server.port})"
        self.stage = "connect"
        self.on_step = on_step
        self.key = f"servers.{name}"
        if server.encryption == "none":
            self.context: ssl.SSLContext | None = None
        elif contexts is not None:
            self.context = contexts.get()
        else:
            self.context = tls_context(server, key=f"{self.key}.ca_file")
        self.client = aiosmtplib.SMTP(  # the port: `_connect` opens the TCP connection
            hostname=server.host, timeout=server.timeout,
            use_tls=server.encryption == "tls", start_tls=False, tls_context=self.context,
            local_hostname=hostname)
        self.last_used = time.monotonic()
        self.idle_handle: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        """Connect, greeting, EHLO, STARTTLS, login. Every failure is reported to `on_step`
        (the step, the reply or local error, and the fix) and raised as a DeliveryFailure."""
        # OAuth: the token first, so that no connection is made while there is none
        token = await self._oauth_token() if self.server.oauth is not None else None
        await self._step("connect", self._connect(), reply_text)
        if self.server.encryption == "tls":
            self._report_certificate()
        await self._step("EHLO", self.client.ehlo(), _first_line)
        if self.server.encryption == "starttls":
            if not self.client.supports_extension("starttls"):
                self._fail(TemporaryFailure(
                    f"{self.label} does not offer STARTTLS, which encryption = \"starttls\" "
                    f"requires{' (the default with auth)' if self._default_encryption else ''}"
                    "; nothing is sent unencrypted. Fix: set "
                    f"{self.key}.encryption = \"none\" if the server is on a trusted network "
                    "(the password then crosses it in clear), or use the server's encrypted "
                    f"port ({self.key}.port = 465 with encryption = \"tls\", or 587 with "
                    "\"starttls\")", stage="STARTTLS"))
            await self._step("STARTTLS", self.client.starttls(tls_context=self.context),
                             reply_text)
            self._report_certificate()
            await self._step("EHLO", self.client.ehlo(), _first_line)
        if self.server.auth is not None:
            await self._authenticate()
        elif token is not None:
            await self._authenticate_xoauth2(token)

    @property
    def _default_encryption(self) -> bool:
        return "encryption" not in self.server.model_fields_set

    async def _connect(self) -> aiosmtplib.SMTPResponse:
        """The TCP connection (bounded by the timeout), then TLS (encryption = "tls") and the
        greeting, so that each failure says which of them it was and what to change."""
        host, port, wait = self.server.host, self.server.port, self.server.timeout
        assert host is not None and port is not None
        key = self.key
        try:
            sock = await asyncio.wait_for(tcp_connect(host, port), wait)
        except TimeoutError:
            raise UpstreamTimeout(
                f"timeout after {wait:g} s connecting to {self.label}: nothing answered "
                f"(a firewall dropping the connection, or a wrong address); check {key}.host "
                f"and {key}.port, or raise {key}.timeout", stage="connect") from None
        except socket.gaierror as e:
            raise UpstreamUnreachable(
                f"{self.label}: the host name {host!r} does not resolve ({e.strerror}); "
                f"check {key}.host", stage="connect") from None
        except ConnectionRefusedError:
            raise UpstreamUnreachable(
                f"{self.label} refused the connection (nothing listens on port {port}); "
                f"check {key}.host and {key}.port ({PORTS})", stage="connect") from None
        except OSError as e:
            raise UpstreamUnreachable(
                f"{self.label}: cannot connect: {e.strerror or e}; check {key}.host and "
                f"{key}.port", stage="connect") from None
        try:
            return await self.client.connect(sock=sock)
        except aiosmtplib.SMTPConnectTimeoutError as e:
            if isinstance(e.__cause__, aiosmtplib.SMTPTimeoutError):  # connected, no banner
                raise UpstreamTimeout(
                    f"no greeting within {wait:g} s from {self.label}: connected, but the "
                    f"server said nothing; {self._silent_fix()}", stage="connect") from None
            raise UpstreamTimeout(  # only with encryption = "tls": the handshake
                f"no TLS handshake within {wait:g} s with {self.label}: connected, but the "
                f"server did not answer TLS; {self._tls_port_fix()}",
                stage="connect") from None
        except aiosmtplib.SMTPConnectResponseError as e:  # a banner that refuses: 421, 554
            raise classify(e, server=self.label, stage="connect", timeout=wait,
                           section=key) from None
        except (ssl.SSLError, aiosmtplib.SMTPConnectError) as e:
            cause = e if isinstance(e, ssl.SSLError) else e.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise classify(cause, server=self.label, stage="connect", timeout=wait,
                               section=key) from None
            if isinstance(cause, ssl.SSLError):
                raise TemporaryFailure(
                    f"TLS with {self.label} failed: {cause.reason or cause}; "
                    f"{self._tls_port_fix()}", stage="connect") from None
            raise UpstreamUnreachable(
                f"{self.label} closed the connection before its greeting; "
                f"{self._silent_fix()}", stage="connect") from None

    def _tls_port_fix(self) -> str:
        return (f"this port does not speak TLS at once (implicit TLS): set {self.key}.port = "
                f"465, or encryption = \"starttls\" (port 587) or \"none\" (port 25) for "
                "this port")

    def _silent_fix(self) -> str:
        if self.server.encryption == "tls":
            return f"check {self.key}.host and {self.key}.port"
        return (f"if this port expects implicit TLS (465), set {self.key}.encryption = "
                f"\"tls\"; otherwise check {self.key}.host and {self.key}.port ({PORTS})")

    def _report_certificate(self) -> None:
        if self.on_step is None:
            return
        cert = self.client.get_transport_info("peercert") or {}
        version = self.client.get_transport_info("ssl_object")
        protocol = version.version() if version is not None else "TLS"
        if not cert:
            self.on_step("certificate", 0.0, f"{protocol}; not verified (tls_verify = false)")
            return
        subject = _name(cert.get("subject", ()))
        issuer = _name(cert.get("issuer", ()))
        expires = cert.get("notAfter", "?")
        self.on_step("certificate", 0.0,
                     f"{protocol}; subject {subject}; issuer {issuer}; expires {expires}")

    # --- one message -------------------------------------------------------------------

    async def transaction(self, message: Outgoing, body: Body) -> list[Outcome]:
        """One message with all its recipients: per-recipient outcomes, or raise for all.

        MAIL refused, or every recipient refused: the transaction is reset (RSET) and
        the session stays usable. A recipient refused with 5xx fails alone, with 4xx is
        deferred alone; DATA refused fails or defers the whole message. A 421 anywhere,
        a timeout or a lost connection fails the whole message (temporarily)."""
        self.last_used = time.monotonic()
        options, utf8 = mail_options(message, body, self.client, self.label)
        encoding = "utf-8" if utf8 else "ascii"
        dsn = self.client.supports_extension("dsn")
        try:
            await self._step("MAIL FROM", self.client.mail(
                message.mail_from, options=options, encoding=encoding))
        except DeliveryFailure as failure:
            await self._reset_after(failure)
            raise
        outcomes: list[Outcome] = []
        for rcpt in message.recipients:
            try:
                reply = await self._step("RCPT TO", self.client.rcpt(
                    rcpt.address, options=rcpt.options if dsn else [], encoding=encoding))
            except DeliveryFailure as failure:
                if not answered(failure):
                    raise  # the connection is gone or going: the whole message
                outcomes.append(Outcome(rcpt.address, failure.reply, failure))
                continue
            outcomes.append(Outcome(rcpt.address, reply_text(reply)))
        if all(o.failure is not None for o in outcomes):
            await self.reset()
            return outcomes
        wait = body.data_timeout(self.server.timeout)
        try:
            final = await self._step("DATA", self.client.data(body.data, timeout=wait),
                                     waited=wait)
        except DeliveryFailure as failure:
            await self._reset_after(failure)
            if eight_bit_refusal(failure, body, self.client):
                failure.reply += (" (the message has 8-bit content and the server does "
                                  "not offer 8BITMIME)")
            raise
        done = reply_text(final)
        return [o if o.failure else Outcome(o.recipient, done) for o in outcomes]

    async def _reset_after(self, failure: DeliveryFailure) -> None:
        """RSET after a refusal the server answered (not a 421: it is closing)."""
        if answered(failure) and self.connected:
            await self.reset()

    async def reset(self) -> None:
        with contextlib.suppress(DeliveryFailure):
            await self._step("RSET", self.client.rset())

    @property
    def connected(self) -> bool:
        return self.client.is_connected

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.quit(), 2)
        self.client.close()


def answered(failure: DeliveryFailure) -> bool:
    """The server refused with a reply and the session goes on: not a timeout, a lost
    connection, a reply that is not SMTP, or a 421 (the server is closing)."""
    return failure.code is not None and failure.code != 421


def _first_line(response: aiosmtplib.SMTPResponse) -> str:
    return f"{response.code} {response.message.splitlines()[0] if response.message else ''}" \
        + f" ({len(response.message.splitlines()) - 1} extensions)"


def _name(rdns: object) -> str:
    parts = [f"{k}={v}" for rdn in rdns for k, v in rdn]  # type: ignore[attr-defined]
    return ", ".join(parts) or "?"
