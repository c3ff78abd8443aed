"""The steps of an SMTP session and its login: SMTP AUTH, DIGEST-MD5 and XOAUTH2.

`Steps` runs each step of a session (relay.upstream.smtp.Session) bounded by the
server's timeout, reports it to `on_step` (`check --connect`) and turns any failure
into a TemporaryFailure or PermanentFailure through `upstream.classify`. `Login`
adds the login, through aiosmtplib's public methods: `auth_plain`, `auth_login`,
`auth_crammd5`, `auth_xoauth2`, and DIGEST-MD5 over `execute_command`
(relay.upstream.digest_md5). An OAuth token comes from relay.oauth; a refused one is
replaced once. A method the server does not offer fails before anything is sent,
naming what it offers and the key to change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

import aiosmtplib

from relay.errors import (
    AuthenticationFailure,
    CredentialError,
    DeliveryFailure,
    Held,
    NotGranted,
    OAuthError,
    TemporaryFailure,
    TokenStoreError,
)
from relay.settings import ServerSettings
from relay.upstream import digest_md5
from relay.upstream.base import classify

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth

log = logging.getLogger("relay.upstream")

OAUTH_RECHECK = 60.0
"""Seconds between looks at the token store while OAuth is not granted (mail held)."""
PORTS = '587 with encryption = "starttls", 465 with "tls", 25 with "none"'
_METHODS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5")
"""What auth.method may name (settings.AuthSettings)."""
T = TypeVar("T")
Step = Callable[[str, float, str], None]


def reply_text(response: aiosmtplib.SMTPResponse) -> str:
    return f"{response.code} {response.message}".replace("\n", " / ")


class Steps:
    """A session's steps: bounded, reported to `on_step`, failures classified."""

    name: str
    server: ServerSettings
    client: aiosmtplib.SMTP
    label: str
    key: str
    stage: str
    on_step: Step | None
    oauth: OAuth | None

    async def _step(self, stage: str, action: Awaitable[T],
                    describe: Callable[[T], str] = str, waited: float | None = None) -> T:
        """Run `action` as the step `stage`; `waited`, when it is not the server's timeout,
        is the one `action` was given (for the text of a timeout)."""
        self.stage = stage
        started = time.monotonic()
        try:
            result = await action
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            failure = classify(e, server=self.label, stage=stage,
                               timeout=waited or self.server.timeout, section=self.key)
            if self.on_step:
                self.on_step(failure.stage or stage, time.monotonic() - started,
                             f"FAILED: {failure.reply}")
            raise failure from None
        if self.on_step:
            self.on_step(stage, time.monotonic() - started, describe(result))
        return result

    def _fail(self, failure: DeliveryFailure) -> NoReturn:
        """Report a failure found here (not by the server's reply) as its step, and raise."""
        if self.on_step:
            self.on_step(failure.stage or self.stage, 0.0, f"FAILED: {failure.reply}")
        raise failure

    def _report(self, stage: str, started: float, answer: str) -> None:
        if self.on_step:
            self.on_step(stage, time.monotonic() - started, answer)


class Login(Steps):
    """SMTP AUTH with a password, or XOAUTH2 with a token from relay.oauth."""

    async def _authenticate(self) -> None:
        auth = self.server.auth
        assert auth is not None
        offered = [m.upper() for m in self.client.server_auth_methods]
        if auth.method not in offered:
            self._fail(AuthenticationFailure(
                f"{self.label} does not offer AUTH {auth.method}; it offers "
                f"{', '.join(offered) or 'no authentication'}; {self._method_fix(offered)}",
                stage=f"AUTH {auth.method}"))
        methods: dict[str, Callable[[str, str], Awaitable[aiosmtplib.SMTPResponse]]] = {
            "PLAIN": self.client.auth_plain,
            "LOGIN": self.client.auth_login,
            "CRAM-MD5": self.client.auth_crammd5,
            "DIGEST-MD5": lambda user, password: digest_md5.authenticate(
                self.client, user, password, host=self.server.host or ""),
        }
        login = methods[auth.method](auth.username, auth.secret())
        await self._step(f"AUTH {auth.method}", login, reply_text)

    def _method_fix(self, offered: list[str]) -> str:
        usable = [m for m in offered if m in _METHODS]
        if usable:
            return f"set {self.key}.auth.method to one of " + ", ".join(f'"{m}"' for m in usable)
        if "XOAUTH2" in offered:
            return (f"this server takes OAuth only: replace [{self.key}.auth] with "
                    f"[{self.key}.oauth] (docs/oauth.md)")
        if offered:
            return "the relay speaks none of them: use another server or port"
        if self.server.encryption == "none" and self.client.supports_extension("starttls"):
            return (f"the server offers AUTH only after STARTTLS: set {self.key}.encryption "
                    "= \"starttls\"")
        return (f"this port takes no login: remove [{self.key}.auth] if the server relays for "
                f"this host without one, or use its submission port ({PORTS})")

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
            done = "oauth authorize" in str(e) or isinstance(e, TokenStoreError | CredentialError)
            fix = "" if done else (
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
            await self._step("AUTH XOAUTH2", self.client.auth_xoauth2(user, token), reply_text)
            return
        except AuthenticationFailure as first:
            log.info("%s refused the OAuth token for %s (%s): getting a new one, trying once "
                     "more", self.label, user, first.reply)
        token = await self._oauth_token(rejected=token)
        try:
            await self._step("AUTH XOAUTH2", self.client.auth_xoauth2(user, token), reply_text)
        except AuthenticationFailure as again:
            refused = again.reply.split(" -- ", 1)[0]  # not the hints about passwords
            raise AuthenticationFailure(  # its step is reported already
                f"{refused} -- a new token was refused too: check that {user} may send "
                "with SMTP AUTH (Exchange Online: \"Authenticated SMTP\" on for the mailbox; "
                "app-only tokens need the app registered as a service principal with SendAs "
                "rights) and that the token's scopes include SMTP",
                code=again.code, stage=again.stage) from None
