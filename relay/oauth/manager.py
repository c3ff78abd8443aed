"""OAuth 2.0 for sending through Gmail and Exchange Online: authorization state and tokens.

`OAuth` is what the daemon, the command line and the admin page use:

- `authorization(client)`: "Granted" / "Not granted", for which mailbox, which scopes,
  until when, and when not granted what to do about it.
- `start_authorization()` / `finish_authorization()`: the authorization-code flow with
  PKCE (S256) and a single-use `state` kept in memory for 10 minutes; the token is
  stored only after the provider has handed it over.
- `access_token(client)`: a token valid for the refresh margin, refreshed before it
  expires by one request however many deliveries ask at once (single-flight); a
  rotated refresh token is stored at once (in a fleet, `refresh_guard` makes that one
  request for every relay). `fresh_token()` replaces a token the SMTP
  server refused. `token_generator()` is aiosmtplib's `oauth_token_generator`.
- `keep_alive()`: the daemon calls it periodically so that an idle relay's refresh
  token is used every few days (Microsoft retires one unused for 90 days).

The app's own grants (client credentials with a secret or a certificate, a Google
service account; relay.oauth.assertions signs) need no person: a token is fetched when
needed. A refused refresh token (`invalid_grant`) makes the authorization "Not granted"
(NotGranted: mail held) and says to run `sysmail-relay oauth authorize`; a refused or
unusable app credential (an expired certificate) does too (CredentialError), saying what
to change. The provider is asked again after APP_RECHECK seconds or a reload; key files
are read for every request, so a renewed certificate sends the held mail. Each new
refusal is logged once, as an error. A provider that does not answer is
ProviderUnreachable (deferred). Tokens live only in the token store (relay.oauth.store)
and in memory: never in a log line, a metric, `status` or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from relay.errors import CredentialError, NotGranted, OAuthError, ProviderRefused
from relay.metrics import Metrics
from relay.oauth.assertions import REFUSED, export_credential_expiry, refusal
from relay.oauth.providers import ProviderClient
from relay.oauth.sign_in import SIGN_IN_TTL, SignIns
from relay.oauth.state import (
    Authorization,
    account_for,
    authorization,
    client_settings,
    clock,
    describe,
    provider_for,
    refused_reason,
    signed_in_as,
    token_from_answer,
)
from relay.oauth.store import StoredToken, TokenStore
from relay.settings import OAuthClientSettings, Settings

__all__ = ["SIGN_IN_TTL", "Authorization", "OAuth", "account_for", "authorization",
           "client_settings", "clock", "describe"]

log = logging.getLogger("relay.oauth")

REFRESH_MARGIN = 15 * 60
"""Refresh an access token this long before it expires (Microsoft refuses ones near expiry)."""
IDLE_REFRESH = 3 * 86400
"""Use the refresh token at least this often, mail or not."""
KEEP_ALIVE_EVERY = 3600.0
"""How often the daemon looks for refresh tokens to keep alive."""
APP_RECHECK = 60.0
"""Seconds before an app credential the provider refused is offered to it again."""


@contextlib.asynccontextmanager
async def _alone(client: str, account: str) -> AsyncIterator[None]:
    yield


class OAuth:
    """Authorization state and tokens for every [oauth_clients.NAME]."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = TokenStore(settings.state_dir / "tokens")
        self.on_granted: list[Callable[[Authorization], None]] = []  # the daemon: held mail
        self._sign_ins = SignIns()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.refresh_guard: Callable[[str, str], AbstractAsyncContextManager[None]] = _alone
        """Held around a refresh: in a fleet, the lock that lets one relay refresh at a
        time (relay.fleet.tokens); alone, nothing more than the lock above."""
        self._recheck: dict[tuple[str, str], float] = {}  # refused app credentials
        self._wake = asyncio.Event()
        export_credential_expiry(settings, metrics)
        for client in {client for client, _ in self._in_use()}:
            with contextlib.suppress(OAuthError):  # keep_alive() logs what is wrong
                self.authorization(client)  # each token's expiry from the first scrape on

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self._recheck.clear()  # a changed credential is tried at once
        export_credential_expiry(settings, self.metrics)
        self._wake.set()  # keep_alive() now: an added client's token and its expiry

    def account(self, client: str) -> str:
        return account_for(self.settings, client)

    def username_for(self, server: str) -> str:
        """The XOAUTH2 user for a server: its oauth.username, else the system address."""
        cfg = self.settings.servers[server].oauth
        assert cfg is not None
        return cfg.username or self.settings.system_account.address or ""

    def authorization(self, client: str) -> Authorization:
        auth = authorization(self.settings, client, self.store)
        self.metrics.oauth_token_expiry.labels(client).set(auth.expires_at or 0)
        return auth

    # --- signing in ------------------------------------------------------------------------

    def start_authorization(self, client: str, redirect_uri: str) -> str:
        """The provider's sign-in address for the browser; its answer goes to redirect_uri."""
        return self._sign_ins.start(self.settings, client, self.account(client), redirect_uri)

    async def finish_authorization(self, state: str, code: str | None, error: str | None,
                                   description: str | None = None) -> Authorization:
        """Take the provider's answer (the redirect's query); store the token. Raises
        OAuthError, and then nothing is stored."""
        client, account, data = await self._sign_ins.finish(self.settings, state, code, error,
                                                            description)
        return await self.store_grant(client, account, data)

    async def store_grant(self, client: str, account: str,
                          data: dict[str, Any]) -> Authorization:
        """Store what the token endpoint gave for a new authorization; tell on_granted."""
        cfg = client_settings(self.settings, client)
        signed_in = signed_in_as(data)
        if cfg.provider == "google" and signed_in and signed_in.lower() != account.lower():
            raise OAuthError(f"signed in as {signed_in}, but the relay sends as {account}: "
                             f"sign in as {account} (or set servers.NAME.oauth.username); "
                             "nothing was stored")
        token = token_from_answer(client, account, cfg, data, None, granted=True)
        if cfg.grant == "authorization_code" and not token.refresh_token:
            log.warning("%s: the provider gave no refresh token for %s: sending works until "
                        "%s, then someone must sign in again", client, account,
                        clock(token.expires_at or time.time()))
        await asyncio.to_thread(self.store.save, token)
        auth = authorization(self.settings, client, self.store, token)
        self.metrics.oauth_token_expiry.labels(client).set(auth.expires_at or 0)
        log.info("%s: OAuth authorization granted for %s (scopes %s)", client, account,
                 " ".join(token.scopes) or "-")
        self._granted(auth)
        return auth

    def _granted(self, auth: Authorization) -> None:
        for callback in self.on_granted:
            callback(auth)

    # --- tokens for sending ------------------------------------------------------------------

    def token_generator(self, client: str, account: str) -> Callable[[], Awaitable[str]]:
        """aiosmtplib's `oauth_token_generator` for one client and mailbox."""
        return lambda: self.access_token(client, account)

    async def access_token(self, client: str, account: str | None = None) -> str:
        """A token valid for the refresh margin. Raises NotGranted, TokenStoreError,
        ProviderUnreachable or OAuthError."""
        account = account or self.account(client)
        token = await asyncio.to_thread(self.store.load, client, account)
        if token is not None and token.fresh(time.time(), REFRESH_MARGIN):
            assert token.access_token is not None
            return token.access_token
        return await self._renew(client, account, None)

    async def fresh_token(self, client: str, rejected: str, account: str | None = None) -> str:
        """A new token for one the server refused (unless another delivery replaced it)."""
        return await self._renew(client, account or self.account(client), rejected)

    async def obtain(self, client: str) -> Authorization:
        """A new access token now (refresh, or client_credentials: the app's "sign-in")."""
        account = self.account(client)
        async with self._locks.setdefault((client, account), asyncio.Lock()):
            token = await asyncio.to_thread(self.store.load, client, account)
            new = await self._obtain(client, account, token)
        auth = authorization(self.settings, client, self.store, new)
        if token is None:  # a refused one is told by _obtain
            self._granted(auth)
        return auth

    async def run(self) -> None:
        """The daemon's task: keep_alive() at start, after a reload and every
        KEEP_ALIVE_EVERY seconds."""
        while True:
            try:
                await self.keep_alive()
            except Exception:  # a bug here must not stop the keep-alive for good
                log.exception("OAuth keep-alive failed; trying again in %.0f s",
                              KEEP_ALIVE_EVERY)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), KEEP_ALIVE_EVERY)
            self._wake.clear()

    async def keep_alive(self) -> None:
        """Use every refresh token not used for IDLE_REFRESH; fetch missing app tokens; log
        what is not granted; export when client certificates (replaced or not) expire."""
        await asyncio.to_thread(export_credential_expiry, self.settings, self.metrics)
        for client, account in sorted(self._in_use()):
            try:
                token = await asyncio.to_thread(self.store.load, client, account)
                if client_settings(self.settings, client).grant != "authorization_code":
                    await self.access_token(client, account)
                elif (token is not None and token.refresh_token and not token.refused
                      and time.time() - token.refreshed_at > IDLE_REFRESH):
                    await self._renew(client, account, token.access_token or "")
                auth = await asyncio.to_thread(self.authorization, client)
                if not auth.granted:
                    log.warning("%s: OAuth authorization Not granted: %s", client, auth.reason)
            except OAuthError as e:
                if not e.logged:
                    log.warning("%s: %s", client, e)

    def _in_use(self) -> set[tuple[str, str]]:
        return {(s.oauth.client, s.oauth.username or self.settings.system_account.address
                 or "") for s in self.settings.servers.values() if s.oauth is not None}

    async def _renew(self, client: str, account: str, rejected: str | None) -> str:
        lock = self._locks.setdefault((client, account), asyncio.Lock())
        # one refresh (in a fleet: one relay refreshes); the others wait and take its token
        async with lock, self.refresh_guard(client, account):
            token = await asyncio.to_thread(self.store.load, client, account)
            if (token is not None and token.access_token is not None
                    and token.access_token != rejected
                    and token.fresh(time.time(), REFRESH_MARGIN)):
                return token.access_token
            new = await self._obtain(client, account, token)
            assert new.access_token is not None
            return new.access_token

    async def _obtain(self, client: str, account: str,
                      token: StoredToken | None) -> StoredToken:
        cfg = client_settings(self.settings, client)
        provider = provider_for(self.settings, client)
        if cfg.grant != "authorization_code":
            data = await self._app_token(client, account, provider, token)
            new = token_from_answer(client, account, cfg, data, token, granted=token is None)
        else:
            if token is None or token.refused or not token.refresh_token:
                auth = await asyncio.to_thread(authorization, self.settings, client,
                                               self.store, token)
                raise NotGranted(auth.reason or "not signed in")
            try:
                data = await self._counted(client, provider.refresh(token.refresh_token))
            except ProviderRefused as e:
                if e.error != "invalid_grant":
                    raise OAuthError(f"{e}: check oauth_clients.{client} (client_id, "
                                     "client_secret, which may have expired)") from None
                return await self._refused(client, account, cfg, token, e)
            new = token_from_answer(client, account, cfg, data, token, granted=False)
            if new.refresh_token != token.refresh_token:
                log.info("%s: the provider rotated the refresh token for %s; the new one is "
                         "stored", client, account)
        await asyncio.to_thread(self.store.save, new)
        self.metrics.oauth_token_expiry.labels(client).set(new.expires_at or 0)
        log.info("%s: new access token for %s, valid until %s", client, account,
                 clock(new.expires_at) if new.expires_at else "it is refused")
        if token is not None and token.refused:  # a renewed app credential: held mail goes
            self._granted(authorization(self.settings, client, self.store, new))
        return new

    async def _app_token(self, client: str, account: str, provider: ProviderClient,
                         token: StoredToken | None) -> dict[str, Any]:
        """The app's own token. A credential refused or unusable: Not granted, with the cause
        and the fix (CredentialError); the provider is asked again after APP_RECHECK."""
        cfg = provider.client
        if token is not None and token.refused and \
                time.monotonic() < self._recheck.get((client, account), 0.0):
            raise CredentialError(token.refused)
        try:
            return await self._counted(client, provider.app_token(account))
        except CredentialError as e:  # nothing was sent; the files are read again next time
            reason = str(e)
        except ProviderRefused as e:
            if e.error not in REFUSED:
                raise OAuthError(f"{e}: check oauth_clients.{client}") from None
            reason = refusal(client, cfg, account, " ".join(provider.endpoints.scopes), e)
            self._recheck[(client, account)] = time.monotonic() + APP_RECHECK
        if token is not None and token.refused == reason:
            raise CredentialError(reason)  # known, stored and logged
        await self._not_granted(token or StoredToken(client, account, cfg.provider, cfg.grant),
                                reason)
        raise CredentialError(reason, logged=True)

    async def _refused(self, client: str, account: str, cfg: OAuthClientSettings,
                       token: StoredToken, e: ProviderRefused) -> StoredToken:
        current = await asyncio.to_thread(self.store.load, client, account)
        if current and current.refresh_token and current.refresh_token != token.refresh_token:
            return await self._obtain(client, account, current)  # signed in again meanwhile
        reason = refused_reason(client, account, cfg, token, e)
        await self._not_granted(token, reason)
        raise NotGranted(reason, logged=True)

    async def _not_granted(self, token: StoredToken, reason: str) -> None:
        """Keep why the provider refused (for `status`), and no secret."""
        await asyncio.to_thread(self.store.save, token.refused_now(reason))
        self.metrics.oauth_token_expiry.labels(token.client).set(0)
        log.error("%s: OAuth authorization is now Not granted: %s", token.client, reason)

    async def _counted(self, client: str, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        try:
            data = await call
        except CredentialError:  # refused here: nothing was asked
            raise
        except ProviderRefused as e:
            result = "invalid_grant" if e.error == "invalid_grant" else "error"
            self.metrics.oauth_refresh.labels(client, result).inc()
            raise
        except OAuthError as e:
            result = "unreachable" if isinstance(e, ConnectionError) else "error"
            self.metrics.oauth_refresh.labels(client, result).inc()
            raise
        self.metrics.oauth_refresh.labels(client, "ok").inc()
        return data
