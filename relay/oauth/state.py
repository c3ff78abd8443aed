"""What the authorization of an OAuth client is, read from the token store.

`authorization()` answers "Granted" / "Not granted" (with why, and what to do) for
`status`, `oauth status`, the admin page and the daemon; `token_from_answer()` turns a
token endpoint's answer into what the store keeps. Blocking (file reads): the daemon
calls these from a thread or with what it has already read.
"""

from __future__ import annotations

import json
import time
from base64 import urlsafe_b64decode
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.errors import OAuthError, ProviderRefused, TokenStoreError
from relay.oauth.providers import ProviderClient
from relay.oauth.store import StoredToken, TokenStore
from relay.settings import OAuthClientSettings, Settings

GOOGLE_TESTING_DAYS = 7
"""Google's refresh tokens of an app in "Testing" publishing status die after a week."""


@dataclass(frozen=True)
class Authorization:
    client: str  # [oauth_clients.NAME]
    provider: str  # google | microsoft | generic
    granted: bool  # "Granted" / "Not granted"
    account: str | None  # the mailbox (username) it is for
    scopes: list[str]
    expires_at: float | None  # access token expiry (epoch)
    reason: str | None  # why not granted / what to do

    @property
    def label(self) -> str:
        return "Granted" if self.granted else "Not granted"


def account_for(settings: Settings, client: str) -> str:
    """The mailbox a client signs in for: the sending server's oauth.username, else the
    system address (the active server first, when it uses this client)."""
    active = settings.system_account.server
    servers = sorted(settings.servers.items(), key=lambda item: item[0] != active)
    for _, server in servers:
        if server.oauth is not None and server.oauth.client == client:
            return server.oauth.username or settings.system_account.address or ""
    return settings.system_account.address or ""


def client_settings(settings: Settings, client: str) -> OAuthClientSettings:
    try:
        return settings.oauth_clients[client]
    except KeyError:
        known = ", ".join(sorted(settings.oauth_clients)) or "none"
        raise OAuthError(f"no [oauth_clients.{client}] in the configuration; defined: "
                         f"{known}") from None


def authorization(settings: Settings, client: str, store: TokenStore | None = None,
                  token: StoredToken | None = None) -> Authorization:
    """The authorization state from the token store (blocking; for `status` and the CLI)."""
    cfg = client_settings(settings, client)
    account = account_for(settings, client)
    store = store or TokenStore(settings.state_dir / "tokens")
    scopes = provider_for(settings, client).endpoints.scopes

    def no(reason: str, token: StoredToken | None = None) -> Authorization:
        return Authorization(client, cfg.provider, False, account,
                             token.scopes if token else scopes, None, reason)

    try:
        token = token or store.load(client, account)
    except TokenStoreError as e:
        return no(str(e))
    run = f"run `sysmail-relay oauth authorize {client}`"
    if token is None and cfg.grant != "authorization_code":
        return no(f"no token yet: the relay fetches one itself ({cfg.grant}) when it sends; "
                  f"{run} to fetch one now")
    if token is None:
        return no(f"not signed in yet for {account}: {run} (or use the admin page's sign-in "
                  "button)")
    if token.refused:
        return no(token.refused, token)
    expired = token.expires_at is not None and token.expires_at <= time.time()
    if expired and not token.refresh_token and cfg.grant == "authorization_code":
        return no(f"the access token expired and the provider gave no refresh token: {run}",
                  token)
    return Authorization(client, cfg.provider, True, account, token.scopes,
                         token.expires_at, None)


def protocol_for(settings: Settings, client: str) -> str:
    """What the client's tokens are for: the `protocol` of the servers that use it ("smtp",
    "graph", "gmail_api"; issue 21), which decides the default scopes."""
    for server in settings.servers.values():
        if server.oauth is not None and server.oauth.client == client:
            return str(getattr(server, "protocol", "smtp"))
    return "smtp"


def provider_for(settings: Settings, client: str) -> ProviderClient:
    """The client's exchanges with its provider, with the scopes its servers need."""
    return ProviderClient(client, client_settings(settings, client),
                          protocol=protocol_for(settings, client))


def refused_reason(client: str, account: str, cfg: OAuthClientSettings, token: StoredToken,
                   e: ProviderRefused) -> str:
    """Why a refresh token the provider refused (invalid_grant) no longer works, and what to
    do; for Google within a week of the sign-in, the likely cause: the Testing status."""
    why = f"{e.error}: {e.description}" if e.description else e.error
    reason = (f"the provider refused the refresh token for {account} ({why}): it was "
              "revoked or has expired, or the password changed. Mail is held until "
              f"someone runs `sysmail-relay oauth authorize {client}`")
    age = (time.time() - token.granted_at) / 86400
    if cfg.provider == "google" and age <= GOOGLE_TESTING_DAYS + 1:
        reason += (f". It was issued {age:.1f} days ago: the likely cause is that the "
                   "OAuth app is still in \"Testing\" publishing status, whose refresh "
                   f"tokens die after {GOOGLE_TESTING_DAYS} days; publish it (Google Cloud "
                   "console, OAuth consent screen, \"Publish app\") and sign in again")
    return reason


def describe(auth: Authorization) -> str:
    """One line for `oauth status`, `status` and logs. Never a token."""
    text = f"{auth.label} ({auth.provider}, {auth.account or 'no account'})"
    if auth.granted and auth.expires_at:
        text += f"; access token valid until {clock(auth.expires_at)}"
    return text + (f": {auth.reason}" if auth.reason else "")


def clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def token_from_answer(client: str, account: str, cfg: OAuthClientSettings, data: dict[str, Any],
           previous: StoredToken | None, *, granted: bool) -> StoredToken:
    """A StoredToken from a token endpoint's answer (keeping the refresh token it replaces
    when the provider does not rotate)."""
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthError("the token endpoint answered without an access_token")
    now = time.time()
    try:
        lifetime: float | None = float(data["expires_in"])
    except (KeyError, TypeError, ValueError):
        lifetime = None
    refresh = data.get("refresh_token")
    scope = data.get("scope")
    base = previous if previous is not None and not granted else None
    scopes = scope.split() if isinstance(scope, str) and scope else \
        (base.scopes if base else ProviderClient(client, cfg).endpoints.scopes)
    token = StoredToken(
        client=client, account=account, provider=cfg.provider, grant=cfg.grant,
        access_token=access, expires_at=now + lifetime if lifetime is not None else None,
        obtained_at=now, scopes=scopes,
        refresh_token=refresh if isinstance(refresh, str) and refresh
        else (base.refresh_token if base else None),
        granted_at=base.granted_at if base else now, refreshed_at=now)
    return token


def signed_in_as(data: dict[str, Any]) -> str | None:
    """The e-mail address in the ID token the token endpoint returned with the tokens (it
    came straight from the provider over TLS, so its signature need not be checked here)."""
    id_token = data.get("id_token")
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return None
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    email = claims.get("email") if isinstance(claims, dict) else None
    return email if isinstance(email, str) else None
