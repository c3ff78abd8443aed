"""One connection to a real SMTP server over aiosmtplib, opened step by step.

`Session` opens the TCP connection itself (so that a connect timeout, a TLS
handshake that never ends and a server that never greets are told apart), reads the
banner, says EHLO, does STARTTLS (required when chosen), logs in by POP before SMTP,
SMTP AUTH or XOAUTH2, and runs one transaction per message, each step bounded by the
server's timeout; a failure at any step becomes a TemporaryFailure or
PermanentFailure (through `upstream.classify` for what the server or the network
did) whose text names the key to change. `probe` runs the same steps for
`check --connect` and prints one line per step, a failing one with its reason and
fix. The pool that reuses sessions is `relay.upstream.smtp_pool.SmtpUpstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX

from relay.errors import (
    AuthenticationFailure,
    DeliveryFailure,
    Held,
    NotGranted,
    OAuthError,
    PermanentFailure,
    Pop3Error,
    TemporaryFailure,
    TokenStoreError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from relay.settings import ServerSettings, file_error
from relay.upstream import digest_md5, pop3
from relay.upstream.base import Outcome, Outgoing, classify, explain
from relay.upstream.body import Body
from relay.upstream.pipeline import Replies

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth

log = logging.getLogger("relay.upstream")

OAUTH_RECHECK = 60.0
"""Seconds between looks at the token store while OAuth is not granted (mail held)."""
_DSN_MAIL = ("RET=", "ENVID=")
T = TypeVar("T")
Step = Callable[[str, float, str], None]
_PORTS = '587 with encryption = "starttls", 465 with "tls", 25 with "none"'
_METHODS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5")
"""What auth.method may name (settings.AuthSettings)."""


async def _tcp_connect(host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket to the first address of `host` that answers.

    Raises socket.gaierror (the name does not resolve) or the last address's OSError.
    The caller bounds the time."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except BaseException as e:
            sock.close()
            if not isinstance(e, OSError):
                raise
            error = e
            continue
        return sock
    raise error


async def pop_before_smtp(name: str, server: ServerSettings,
                          on_step: Step | None = None) -> str:
    """Log in to the server's POP3 account so that it lets this address send.

    Raises AuthenticationFailure (the POP server refused the login) or
    TemporaryFailure (unreachable, timeout, TLS), with the POP server's answer.
    """
    pop = server.pop_before_smtp
    assert pop is not None and pop.port is not None
    where = f"{name}: POP before SMTP at {pop.host}:{pop.port}"
    context = (tls_context(server, pop.ca_file,
                           f"servers.{name}.pop_before_smtp.ca_file" if pop.ca_file
                           else f"servers.{name}.ca_file")
               if pop.encryption != "none" else None)

    def step(stage: str, seconds: float, answer: str) -> None:
        if on_step is not None:
            on_step(f"POP {stage}", seconds, answer)

    try:
        return await pop3.pop_login(
            pop.host, pop.port, encryption=pop.encryption, ssl_context=context,
            timeout=pop.timeout, username=pop.username, password=pop.secret(), apop=pop.apop,
            on_step=step)
    except Pop3Error as e:
        reply = _pop_fix(name, e)
        if on_step is not None:
            on_step(f"POP {e.stage or 'login'}", 0.0, f"FAILED: {reply}")
        refused = e.stage in ("USER", "PASS", "APOP") and not isinstance(e, TimeoutError)
        kind = AuthenticationFailure if refused else TemporaryFailure
        raise kind(f"{where}: {reply}", stage=f"POP {e.stage or 'login'}") from None


def _pop_fix(name: str, error: Pop3Error) -> str:
    """The POP server's answer with the full key to change (servers.NAME.pop_before_smtp.*)."""
    key = f"servers.{name}.pop_before_smtp"
    reply = re.sub(r"(?<![\w.])pop_before_smtp\.", f"{key}.", error.reply)
    if "pop_before_smtp" in error.reply or "ca_file" in error.reply:
        return reply.replace("with ca_file", f"with {key}.ca_file")
    if isinstance(error, TimeoutError):
        return (f"{reply}; check {key}.host and port (995 with encryption = \"tls\", 110 "
                f"otherwise), or raise {key}.timeout")
    return f"{reply}; check {key}.host, port and encryption"


def tls_context(server: ServerSettings, ca_file: Path | None = None,
                key: str = "ca_file") -> ssl.SSLContext:
    """System trust (plus `ca_file`, else the server's ca_file), the server's name checked,
    TLS 1.2 or newer. The POP connection passes `pop_before_smtp.ca_file`.

    A CA file that cannot be read (removed after the configuration was checked) raises
    TemporaryFailure naming `key` and the path, never a bare OSError."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    extra = ca_file or server.ca_file
    if extra is not None:
        try:
            context.load_verify_locations(cafile=str(extra))
        except OSError as e:  # ssl.SSLError too: not PEM
            problem = file_error(e) if not isinstance(e, ssl.SSLError) else \
                f"not a PEM CA certificate ({e.reason or e}); export the CA as PEM"
            raise TemporaryFailure(f"{key} = {str(extra)!r}: {problem}",
                                   stage="TLS setup") from None
    if not server.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Session:
    """One connection to the server, opened, encrypted and authenticated."""

    def __init__(self, name: str, server: ServerSettings, hostname: str,
                 on_step: Step | None = None, oauth: OAuth | None = None) -> None:
        assert server.host is not None and server.port is not None
        self.name = name
        self.server = server
        self.oauth = oauth
        self.label = f"{name} ({server.host}:{server.port})"
        self.stage = "connect"
        self.on_step = on_step
        self.key = f"servers.{name}"
        self.context = (tls_context(server, key=f"{self.key}.ca_file")
                        if server.encryption != "none" else None)
        self.client = aiosmtplib.SMTP(  # the port: `_connect` opens the TCP connection
            hostname=server.host, timeout=server.timeout,
            use_tls=server.encryption == "tls", start_tls=False, tls_context=self.context,
            local_hostname=hostname)
        self.last_used = time.monotonic()
        self.idle_handle: asyncio.TimerHandle | None = None
        self.busy = 0
        """Transactions running on this session: two when one follows another's final dot."""
        self._replies: Replies | None = None
        self._turn = asyncio.Event()
        self._turn.set()

    async def _step(self, stage: str, action: Awaitable[T],
                    describe: Callable[[T], str] = str) -> T:
        self.stage = stage
        started = time.monotonic()
        try:
            result = await action
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            failure = classify(e, server=self.label, stage=stage, timeout=self.server.timeout,
                               section=self.key)
            if self.on_step:
                self.on_step(failure.stage or stage, time.monotonic() - started,
                             f"FAILED: {failure.reply}")
            raise failure from None
        if self.on_step:
            self.on_step(stage, time.monotonic() - started, describe(result))
        return result

    async def open(self) -> None:
        """Connect, greeting, EHLO, STARTTLS, login. Every failure is reported to `on_step`
        (the step, the reply or local error, and the fix) and raised as a DeliveryFailure."""
        # OAuth: the token first, so that no connection is made while there is none
        token = await self._oauth_token() if self.server.oauth is not None else None
        await self._step("connect", self._connect(), _reply)
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
            await self._step("STARTTLS", self.client.starttls(tls_context=self.context), _reply)
            self._report_certificate()
            await self._step("EHLO", self.client.ehlo(), _first_line)
        if self.server.auth is not None:
            await self._authenticate()
        elif token is not None:
            await self._authenticate_xoauth2(token)

    @property
    def _default_encryption(self) -> bool:
        return "encryption" not in self.server.model_fields_set

    def _fail(self, failure: DeliveryFailure) -> NoReturn:
        """Report a failure found here (not by the server's reply) as its step, and raise."""
        if self.on_step:
            self.on_step(failure.stage or self.stage, 0.0, f"FAILED: {failure.reply}")
        raise failure

    async def _connect(self) -> aiosmtplib.SMTPResponse:
        """The TCP connection (bounded by the timeout), then TLS (encryption = "tls") and the
        greeting, so that each failure says which of them it was and what to change."""
        host, port, wait = self.server.host, self.server.port, self.server.timeout
        assert host is not None and port is not None
        key = self.key
        try:
            sock = await asyncio.wait_for(_tcp_connect(host, port), wait)
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
                f"check {key}.host and {key}.port ({_PORTS})", stage="connect") from None
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
        except aiosmtplib.SMTPConnectResponseError as e:
            raise self._refused("connect", aiosmtplib.SMTPResponse(e.code, e.message)) \
                from None
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
                f"\"tls\"; otherwise check {self.key}.host and {self.key}.port ({_PORTS})")

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

    async def _authenticate(self) -> None:
        auth = self.server.auth
        assert auth is not None
        offered = [m.upper() for m in self.client.server_auth_methods]
        if auth.method not in offered:
            usable = [m for m in offered if m in _METHODS]
            if usable:
                fix = (f"set {self.key}.auth.method to one of "
                       + ", ".join(f'"{m}"' for m in usable))
            elif "XOAUTH2" in offered:
                fix = (f"this server takes OAuth only: replace [{self.key}.auth] with "
                       f"[{self.key}.oauth] (docs/oauth.md)")
            elif offered:
                fix = "the relay speaks none of them: use another server or port"
            elif (self.server.encryption == "none"
                  and self.client.supports_extension("starttls")):
                fix = (f"the server offers AUTH only after STARTTLS: set {self.key}.encryption "
                       "= \"starttls\"")
            else:
                fix = (f"this port takes no login: remove [{self.key}.auth] if the server "
                       "relays for this host without one, or use its submission port "
                       f"({_PORTS})")
            self._fail(AuthenticationFailure(
                f"{self.label} does not offer AUTH {auth.method}; it offers "
                f"{', '.join(offered) or 'no authentication'}; {fix}",
                stage=f"AUTH {auth.method}"))
        methods: dict[str, Callable[[str, str], Awaitable[aiosmtplib.SMTPResponse]]] = {
            "PLAIN": self.client.auth_plain,
            "LOGIN": self.client.auth_login,
            "CRAM-MD5": self.client.auth_crammd5,
            "DIGEST-MD5": lambda user, password: digest_md5.authenticate(
                self.client, user, password, host=self.server.host or ""),
        }
        login = methods[auth.method](auth.username, auth.secret())
        await self._step(f"AUTH {auth.method}", login, _reply)

    # --- OAuth 2.0: XOAUTH2 with a token from relay.oauth -------------------------------

    def _oauth_user(self) -> tuple[OAuth, str, str]:
        cfg = self.server.oauth
        if self.oauth is None or cfg is None:
            self._fail(TemporaryFailure(f"{self.label}: OAuth is configured but not available "
                                        "here (internal error)", stage="OAuth token"))
        return self.oauth, cfg.client, self.oauth.username_for(self.name)

    async def _oauth_token(self, rejected: str | None = None) -> str:
        """A token from the oauth module (aiosmtplib's oauth_token_generator), or, after the
        server refused `rejected`, a new one. Not granted: Held (the mail waits, it is not an
        attempt); provider unreachable or refusing: TemporaryFailure (deferred)."""
        oauth, client, user = self._oauth_user()
        stage = "OAuth token" if rejected is None else "OAuth refresh"
        action = (oauth.token_generator(client, user)() if rejected is None
                  else oauth.fresh_token(client, rejected, user))
        started = time.monotonic()
        try:
            token = await action
        except (NotGranted, TokenStoreError) as e:
            fix = "" if "oauth authorize" in str(e) or isinstance(e, TokenStoreError) else (
                f"; sign in: `sysmail-relay oauth authorize {client}` (or the admin page's "
                "sign-in button)")
            self._report(stage, started, f"FAILED: Not granted: {e}{fix}")
            raise Held(f"{self.label}: OAuth authorization Not granted for {user}: {e}{fix}",
                       stage=stage, retry_at=time.time() + OAUTH_RECHECK) from None
        except OAuthError as e:
            fix = "" if "oauth_clients." in str(e) else (
                f"; check oauth_clients.{client} (token_url, client_id, the secret) and that "
                "the provider can be reached from here")
            self._report(stage, started, f"FAILED: {e}{fix}")
            raise TemporaryFailure(f"{self.label}: no OAuth token for {user}: {e}{fix}",
                                   stage=stage) from None
        self._report(stage, started, f"ok for {user} (client {client}; token not shown)")
        return token

    def _report(self, stage: str, started: float, answer: str) -> None:
        if self.on_step:
            self.on_step(stage, time.monotonic() - started, answer)

    async def _authenticate_xoauth2(self, token: str) -> None:
        """AUTH XOAUTH2; when the server refuses the token (535, or 334 with its JSON error,
        which aiosmtplib answers), get a new one and try once more."""
        _, _, user = self._oauth_user()
        offered = [m.upper() for m in self.client.server_auth_methods]
        if "XOAUTH2" not in offered:
            self._fail(AuthenticationFailure(
                f"{self.label} does not offer AUTH XOAUTH2; it offers "
                f"{', '.join(offered) or 'no authentication'}; check {self.key}.host and "
                f"{self.key}.port (the provider's SMTP submission server), or use "
                f"[{self.key}.auth] instead of [{self.key}.oauth]", stage="AUTH XOAUTH2"))
        try:
            await self._step("AUTH XOAUTH2", self.client.auth_xoauth2(user, token), _reply)
            return
        except AuthenticationFailure as first:
            log.info("%s refused the OAuth token for %s (%s): getting a new one, trying once "
                     "more", self.label, user, first.reply)
        token = await self._oauth_token(rejected=token)
        try:
            await self._step("AUTH XOAUTH2", self.client.auth_xoauth2(user, token), _reply)
        except AuthenticationFailure as again:
            refused = again.reply.split(" -- ", 1)[0]  # not the hints about passwords
            raise AuthenticationFailure(  # its step is reported already
                f"{refused} -- a new token was refused too: check that {user} may send "
                "with SMTP AUTH (Exchange Online: \"Authenticated SMTP\" on for the mailbox; "
                "app-only tokens need the app registered as a service principal with SendAs "
                "rights) and that the token's scopes include SMTP",
                code=again.code, stage=again.stage) from None

    async def transaction(self, message: Outgoing, body: Body,
                          sent: Callable[[], None] | None = None) -> list[Outcome]:
        """One message with all its recipients: per-recipient outcomes, or raise for all.

        A server that offers PIPELINING gets MAIL, every RCPT and DATA in one write
        (RFC 2920), and the message once DATA's 354 and a recipient's 250 are in; any
        other server one command at a time. Each reply is checked in order either way,
        and a transaction refused before its message went out is reset (RSET) before
        the session is used again.

        With PIPELINING, `sent` is called once the message and its final dot are
        written: the next transaction may then start on this session while this one
        waits for its reply (its commands follow the dot, its replies this one's)."""
        self.last_used = time.monotonic()
        mail_options, utf8 = self._mail_options(message, body)
        encoding = "utf-8" if utf8 else "ascii"
        dsn = self.client.supports_extension("dsn")
        mail = _command(b"MAIL FROM:", message.mail_from, mail_options, encoding)
        rcpts = [_command(b"RCPT TO:", r.address, r.options if dsn else [], encoding)
                 for r in message.recipients]
        together = self.client.supports_extension("pipelining")
        wait = self.server.timeout
        outcomes: list[Outcome] = []
        final: aiosmtplib.SMTPResponse | None = None
        before, done = self._turn, asyncio.Event()
        self._turn = done
        if self._replies is None:
            self._replies = Replies(self.client)
        try:
            with self._replies as replies:
                replies.write(b"".join([mail, *rcpts, b"DATA\r\n"]) if together else mail)
                await before.wait()  # the transaction before reads its last reply first
                sender = await self._next(replies, "MAIL FROM")
                for rcpt, line in zip(message.recipients, rcpts, strict=True):
                    if not together:
                        if sender.code != 250:
                            break
                        replies.write(line)
                    reply = await self._next(replies, "RCPT TO")
                    outcomes.append(self._recipient(rcpt.address, reply))
                accepted = sender.code == 250 and any(o.failure is None for o in outcomes)
                if not together and accepted:
                    replies.write(b"DATA\r\n")
                start = await self._next(replies, "DATA") if together or accepted else None
                if start is not None and start.code == 354:
                    if accepted:
                        await self._step("DATA", body.write(replies, wait))
                        if together and sent is not None:
                            sent()
                    else:  # the server took DATA without a recipient: end it empty
                        replies.write(b".\r\n")
                    final = await self._next(replies, "DATA")
        finally:
            done.set()
        if sender.code != 250:
            await self.reset()
            raise self._refused("MAIL FROM", sender)
        if not accepted:
            await self.reset()
            return outcomes
        assert start is not None
        if start.code != 354 or final is None or final.code != 250:
            if final is None:  # the end of data was never sent; its reply ends a transaction
                await self.reset()
            failure = self._refused("DATA", start if final is None else final)
            if _eight_bit_refusal(failure, body, self.client):
                failure.reply += (" (the message has 8-bit content and the server does "
                                  "not offer 8BITMIME)")
            raise failure
        done_reply = _reply(final)
        return [o if o.failure else Outcome(o.recipient, done_reply) for o in outcomes]

    async def _next(self, replies: Replies, stage: str) -> aiosmtplib.SMTPResponse:
        """The next reply; a 421 (the server is closing the connection) raises at once."""
        reply = await self._step(stage, replies.next(self.server.timeout))
        if reply.code == 421:
            raise self._refused(stage, reply)
        return reply

    def _recipient(self, address: str, reply: aiosmtplib.SMTPResponse) -> Outcome:
        if reply.code in (250, 251):
            return Outcome(address, _reply(reply))
        failure = self._refused("RCPT TO", reply)
        return Outcome(address, failure.reply, failure)

    def _refused(self, stage: str, reply: aiosmtplib.SMTPResponse) -> DeliveryFailure:
        """The server's refusal at `stage`, temporary or permanent by its code."""
        self.stage = stage
        return classify(aiosmtplib.SMTPResponseException(reply.code, reply.message),
                        server=self.label, stage=stage, timeout=self.server.timeout,
                        section=self.key)

    def _mail_options(self, message: Outgoing, body: Body) -> tuple[list[str], bool]:
        env = message.envelope
        client = self.client
        options: list[str] = []
        addresses_ascii = message.mail_from.isascii() and all(
            r.address.isascii() for r in message.recipients)
        utf8 = not addresses_ascii or "SMTPUTF8" in env.mail_options
        if utf8 and client.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        elif not addresses_ascii:
            raise PermanentFailure(
                f"the message needs SMTPUTF8 (non-ASCII addresses), which {self.label} does "
                "not offer", stage="MAIL FROM")
        elif utf8 and not body.headers_ascii:
            raise PermanentFailure(
                f"the message has UTF-8 headers (SMTPUTF8), which {self.label} does not "
                "offer", stage="MAIL FROM")
        else:
            utf8 = False
        if not body.ascii and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        limit = client.esmtp_extensions.get("size", "")
        if limit.isdigit() and int(limit) and body.size > int(limit):
            raise PermanentFailure(
                f"the message is {body.size} bytes; {self.label} accepts at most {limit} "
                "(its SIZE)", stage="MAIL FROM")
        if client.supports_extension("size"):
            options.append(f"SIZE={body.size}")
        dsn = [o for o in env.mail_options if o.startswith(_DSN_MAIL)]
        if client.supports_extension("dsn"):
            options.extend(dsn)
        elif dsn or any(r.options for r in message.recipients):
            log.info("%s: %s does not offer DSN: delivery status notification requests "
                     "dropped", env.id, self.label)
        return options, utf8

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


def _command(verb: bytes, address: str, options: list[str], encoding: str) -> bytes:
    """A MAIL or RCPT command line as aiosmtplib writes it (its address checks included)."""
    args = [verb + quote_address(address).encode(encoding), *(o.encode("ascii") for o in options)]
    if any(COMMAND_INJECTION_REGEX.search(arg) for arg in args):
        raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def _reply(response: aiosmtplib.SMTPResponse) -> str:
    return f"{response.code} {response.message}".replace("\n", " / ")


def _first_line(response: aiosmtplib.SMTPResponse) -> str:
    return f"{response.code} {response.message.splitlines()[0] if response.message else ''}" \
        + f" ({len(response.message.splitlines()) - 1} extensions)"


def _name(rdns: object) -> str:
    parts = [f"{k}={v}" for rdn in rdns for k, v in rdn]  # type: ignore[attr-defined]
    return ", ".join(parts) or "?"


def _eight_bit_refusal(failure: DeliveryFailure, body: Body, client: aiosmtplib.SMTP) -> bool:
    return (isinstance(failure, PermanentFailure) and not body.ascii
            and not client.supports_extension("8bitmime"))


async def probe(name: str, server: ServerSettings, hostname: str,
                emit: Callable[[str], None], oauth: OAuth | None = None) -> bool:
    """`check --connect`: open a session step by step, print each step, QUIT.

    Every step prints one line; a failing one says FAILED, the server's reply or the
    local error, and the fix. Nothing ends without a reason (no traceback)."""
    failed = False

    def step(stage: str, seconds: float, answer: str) -> None:
        nonlocal failed
        failed = failed or answer.startswith("FAILED")
        emit(f"{stage:<16} {seconds * 1000:7.1f} ms  {explain(answer)}")

    session: Session | None = None
    try:
        session = Session(name, server, hostname, on_step=step, oauth=oauth)
        if server.pop_before_smtp is not None:
            await pop_before_smtp(name, server, on_step=step)
            if server.pop_before_smtp.wait:
                await asyncio.sleep(server.pop_before_smtp.wait)
        await session.open()
    except DeliveryFailure as e:
        if not failed:  # a failure found before any step ran (the TLS setup)
            step(e.stage or "connect", 0.0, f"FAILED: {e.reply}")
        if session is not None:
            await session.quit()
        return False
    except Exception as e:  # a bug: still one line with what happened, not a traceback
        step(session.stage if session else "setup", 0.0,
             f"FAILED: internal error in the relay: {e!r}; please report it")
        if session is not None:
            await session.quit()
        return False
    started = time.monotonic()
    await session.quit()
    step("QUIT", time.monotonic() - started, "closed")
    return True
