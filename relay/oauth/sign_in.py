"""Sign-ins started here and waiting for the provider's answer: the authorization-code flow
with PKCE (S256) and a single-use `state` kept in memory for SIGN_IN_TTL seconds.

`start()` gives the provider's sign-in address; `finish()` takes the answer the browser
brought back (the redirect's query) and exchanges the code. Nothing is stored here: the
caller (relay.oauth.manager) stores the token only after the provider handed it over.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from relay.errors import OAuthError, ProviderRefused
from relay.oauth.providers import provider_text
from relay.oauth.state import client_settings, provider_for
from relay.settings import Settings

SIGN_IN_TTL = 600
"""Seconds a started sign-in (its state and PKCE verifier) waits for the provider's answer."""


@dataclass(frozen=True)
class _SignIn:
    client: str
    account: str
    verifier: str
    redirect_uri: str
    expires: float


class SignIns:
    """The sign-ins waiting for an answer, by `state`."""

    def __init__(self) -> None:
        self._open: dict[str, _SignIn] = {}

    def start(self, settings: Settings, client: str, account: str, redirect_uri: str) -> str:
        """The provider's sign-in address for the browser; its answer goes to redirect_uri."""
        cfg = client_settings(settings, client)
        if cfg.grant != "authorization_code":
            raise OAuthError(f"oauth_clients.{client} uses grant = \"{cfg.grant}\": nobody "
                             f"signs in; `sysmail-relay oauth authorize {client}` fetches a "
                             "token")
        now = time.monotonic()
        self._open = {k: v for k, v in self._open.items() if v.expires > now}
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)
        url = provider_for(settings, client).authorization_url(redirect_uri, state, verifier,
                                                               login_hint=account or None)
        self._open[state] = _SignIn(client, account, verifier, redirect_uri, now + SIGN_IN_TTL)
        return url

    async def finish(self, settings: Settings, state: str, code: str | None,
                     error: str | None, description: str | None
                     ) -> tuple[str, str, dict[str, Any]]:
        """(client, account, what the token endpoint gave) for the provider's answer.
        Raises OAuthError."""
        sign_in = self._open.pop(state, None) if state else None
        if sign_in is None:
            raise OAuthError("this answer does not belong to a sign-in started here (unknown "
                             "or already used state); nothing was stored: start the sign-in "
                             "again")
        if sign_in.expires < time.monotonic():
            raise OAuthError(f"the sign-in took longer than {SIGN_IN_TTL // 60} minutes; "
                             "nothing was stored: start it again")
        cfg = client_settings(settings, sign_in.client)
        if error:
            error, description = provider_text(error, description, (state,))
            why = f"{error}: {description}" if description else error
            raise OAuthError(f"the sign-in at {cfg.provider} was refused or cancelled ({why});"
                             f" nothing was stored. Sign in again as {sign_in.account} and "
                             "allow access")
        if not code:
            raise OAuthError("the provider's answer has neither a code nor an error; nothing "
                             "was stored: start the sign-in again")
        provider = provider_for(settings, sign_in.client)
        try:
            data = await provider.exchange_code(code, sign_in.redirect_uri, sign_in.verifier)
        except ProviderRefused as e:
            hint = (" (the code was already used or has expired)"
                    if e.error == "invalid_grant" else "")
            raise OAuthError(f"{e}{hint}; nothing was stored: start the sign-in "
                             "again") from None
        return sign_in.client, sign_in.account, data
