"""The providers: where their endpoints are, what SMTP needs from them, and each HTTP exchange.

`endpoints()` knows Google, Microsoft (per tenant) and a generic provider (URLs from
the configuration, which can also override Google's and Microsoft's, e.g. for a
national cloud), and the scopes each needs for SMTP, Graph or the Gmail API.
`ProviderClient` does one exchange at a time with one client's credentials: authlib
builds and checks the OAuth messages (authorization URL with PKCE S256, token
requests, client authentication by secret or by a signed assertion from
relay.oauth.assertions, revocation), httpx carries them, and every way it can go
wrong leaves this module as ProviderRefused (the provider said no, with its error
code), ProviderUnreachable (no answer, 5xx) or OAuthError. No message here contains
a token, a code, a secret or an assertion: a provider's error code and
`error_description` are shown only through `provider_text`, which takes out anything
the request carried (a provider may echo it), control characters and all but the
first DESCRIPTION_MAX characters. authlib (and with it joserfc and cryptography) is
imported when a client is first used: a relay without OAuth does not load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx

from relay.errors import OAuthError, ProviderRefused, ProviderUnreachable
from relay.oauth.assertions import bearer_grant, client_assertion
from relay.oauth.scopes import default_scopes
from relay.settings import OAuthClientSettings

HTTP_TIMEOUT = 15.0
DESCRIPTION_MAX = 200
"""Characters of a provider's error_description shown (in `check`, logs, the page)."""
_ERROR_CODE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")  # RFC 6749 5.2
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SENT_MIN = 8
"""Shorter values sent (grant_type=..., a scope) are not worth hiding and would blank words."""
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
GOOGLE = {"authorize": "https://accounts.google.com/o/oauth2/v2/auth",
          "token": "https://oauth2.googleapis.com/token",
          "revoke": "https://oauth2.googleapis.com/revoke"}
MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}"
@dataclass(frozen=True)
class Endpoints:
    provider: str
    authorize_url: str | None
    token_url: str
    device_url: str | None
    revocation_url: str | None
    scopes: list[str]
    extra: dict[str, str] = field(default_factory=dict)  # more authorization parameters
    no_device: str | None = None  # why the device flow is not offered


def endpoints(name: str, client: OAuthClientSettings, protocol: str = "smtp") -> Endpoints:
    """The provider's endpoints and scopes, with the configuration's overrides. (A service
    account's token URL is its JSON key's token_uri, unless token_url is set.)"""
    scopes = default_scopes(client.provider, client.grant, protocol)
    if client.provider == "google":
        base = Endpoints(
            "google", GOOGLE["authorize"], GOOGLE["token"], None, GOOGLE["revoke"],
            scopes, {"access_type": "offline", "prompt": "consent"},
            no_device="Google does not allow the Gmail scope (https://mail.google.com/) in "
                      f"its device flow: run `sysmail-relay oauth authorize {name}` without "
                      "--device (it prints an address to open in any browser, and takes the "
                      "address the browser ends up at when that browser is on another "
                      "machine), or use the admin page's \"Sign in with Google\"")
    elif client.provider == "microsoft":
        def url(endpoint: str) -> str:
            return MICROSOFT.format(tenant=client.tenant, endpoint=endpoint)

        base = Endpoints("microsoft", url("authorize"), url("token"), url("devicecode"), None,
                         scopes)
    else:
        base = Endpoints("generic", client.authorize_url, client.token_url or "",
                         client.device_url, client.revocation_url, scopes,
                         no_device=f"oauth_clients.{name} has no device_url: set it to the "
                                   "provider's device authorization endpoint (RFC 8628), or "
                                   "sign in without --device")
    device = client.device_url or base.device_url
    return Endpoints(
        base.provider, client.authorize_url or base.authorize_url,
        client.token_url or base.token_url, device,
        client.revocation_url or base.revocation_url,
        list(client.scopes) if client.scopes is not None else base.scopes, base.extra,
        None if device else base.no_device)


@dataclass(frozen=True)
class DeviceGrant:
    """What the device authorization endpoint answered (RFC 8628 3.2)."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float
    interval: float


class ProviderClient:
    """The HTTP exchanges of one [oauth_clients.NAME] with its provider."""

    def __init__(self, name: str, client: OAuthClientSettings,
                 timeout: float = HTTP_TIMEOUT, protocol: str = "smtp") -> None:
        self.name = name
        self.client = client
        self.endpoints = endpoints(name, client, protocol)
        self.timeout = timeout
        secret = client.client_secret.get_secret_value() if client.client_secret else None
        # a certificate: private_key_jwt, its assertion added per request (client_id too)
        method = ("none" if secret is None else
                  "client_secret_basic" if client.provider == "generic" else
                  "client_secret_post")
        from authlib.oauth2.auth import ClientAuth  # type: ignore[import-untyped]
        self._auth: ClientAuth | None = ClientAuth(client.client_id, secret, method)
        if client.grant == "service_account":
            self._auth = None  # its signed assertion is the only proof: no client_id sent

    def authorization_url(self, redirect_uri: str, state: str, verifier: str,
                          login_hint: str | None) -> str:
        url = self.endpoints.authorize_url
        if not url:
            raise OAuthError(f"oauth_clients.{self.name} has no authorize_url: set it to the "
                             "provider's authorization endpoint to sign in")
        extra = dict(self.endpoints.extra)
        if login_hint:
            extra["login_hint"] = login_hint
        from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
            prepare_grant_uri,
        )
        from authlib.oauth2.rfc7636 import (  # type: ignore[import-untyped]
            create_s256_code_challenge,
        )
        uri: str = prepare_grant_uri(
            url, self.client.client_id, "code", redirect_uri=redirect_uri,
            scope=self.endpoints.scopes, state=state,
            code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256",
            **extra)
        return uri

    async def exchange_code(self, code: str, redirect_uri: str,
                            verifier: str) -> dict[str, Any]:
        return await self._token("authorization_code", code=code, redirect_uri=redirect_uri,
                                 code_verifier=verifier)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        # Microsoft wants the scopes again on every refresh; the others keep the granted ones
        scope = {"scope": self._scope()} if self.endpoints.provider == "microsoft" else {}
        return await self._token("refresh_token", refresh_token=refresh_token, **scope)

    async def app_token(self, account: str) -> dict[str, Any]:
        """A token for the app itself: client credentials (with a client secret or a
        certificate's signed assertion), or a service account's JWT bearer grant acting
        for `account`. Raises CredentialError when a key file cannot be used."""
        if self.client.grant == "service_account":
            url, params = bearer_grant(self.name, self.client, account, self._scope())
            return await self._post(url, urlencode(params), "the token endpoint")
        if self.client.certificate:
            assertion = client_assertion(self.name, self.client, self.endpoints.token_url)
            return await self._token("client_credentials", scope=self._scope(), **assertion)
        return await self._token("client_credentials", scope=self._scope())

    async def start_device(self) -> DeviceGrant:
        if not self.endpoints.device_url:
            raise OAuthError(self.endpoints.no_device or "no device authorization endpoint")
        url = self.endpoints.device_url
        answer = await self._post(url, urlencode({"scope": self._scope()}),
                                  "the device authorization endpoint")
        try:
            return DeviceGrant(
                answer["device_code"], answer["user_code"],
                answer.get("verification_uri") or answer["verification_url"],
                answer.get("verification_uri_complete"),
                time.time() + float(answer.get("expires_in", 900)),
                float(answer.get("interval", 5)))
        except (KeyError, TypeError, ValueError):
            raise OAuthError(f"{url} answered without device_code, user_code and "
                             "verification_uri (RFC 8628): is it a device endpoint?") from None

    async def poll_device(self, grant: DeviceGrant) -> dict[str, Any]:
        """Ask the token endpoint until the person has approved (or refused, or time ran out)."""
        interval = grant.interval
        while True:
            await asyncio.sleep(interval)
            try:
                return await self._token(DEVICE_GRANT, device_code=grant.device_code)
            except ProviderRefused as e:
                if e.error == "slow_down":
                    interval += 5
                elif e.error != "authorization_pending":
                    raise
            if time.time() > grant.expires_at:
                raise ProviderRefused("the code was not entered in time; run the command "
                                      "again", error="expired_token")

    async def revoke(self, token: str, hint: str) -> bool:
        """Revoke at the provider (RFC 7009); False when it has no revocation endpoint."""
        url = self.endpoints.revocation_url
        if not url:
            return False
        from authlib.oauth2.rfc7009 import (  # type: ignore[import-untyped]
            prepare_revoke_token_request,
        )
        body, headers = prepare_revoke_token_request(token, hint, "", None)
        await self._post(url, body, "the revocation endpoint", headers=headers,
                         tolerate={"invalid_token"})
        return True

    def _scope(self) -> str:
        return " ".join(self.endpoints.scopes)

    async def _token(self, grant: str, **params: str) -> dict[str, Any]:
        if not self.endpoints.token_url:
            raise OAuthError(f"oauth_clients.{self.name} has no token_url")
        from authlib.oauth2.rfc6749.parameters import prepare_token_request
        body = prepare_token_request(grant, "", **params)
        return await self._post(self.endpoints.token_url, body, "the token endpoint")

    async def _post(self, url: str, body: str, what: str, *,
                    headers: dict[str, str] | None = None,
                    tolerate: set[str] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json",
                   "Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        if self._auth is not None:
            url, headers, body = self._auth.prepare("POST", url, headers, body)
        async with _http(url, what, self.timeout) as http:
            response = await http.post(url, content=body, headers=headers)
        sent = [value for _, value in parse_qsl(body)]
        sent += [headers.get("Authorization", "").partition(" ")[2], self.client.client_id or ""]
        if self.client.client_secret is not None:
            sent.append(self.client.client_secret.get_secret_value())
        return _answer(response, url, what, tolerate or set(), sent)


@contextlib.asynccontextmanager
async def _http(url: str, what: str, seconds: float) -> AsyncIterator[httpx.AsyncClient]:
    try:
        async with httpx.AsyncClient(timeout=seconds) as http:
            yield http
    except httpx.TimeoutException:
        raise ProviderUnreachable(f"{what} {url} did not answer within {seconds:g} s; "
                                  "trying again later") from None
    except httpx.TransportError as e:
        reason = str(e) or type(e).__name__
        raise ProviderUnreachable(f"cannot reach {what} {url}: {reason}; trying again "
                                  "later") from None


def provider_text(error: object, description: object,
                  sent: list[str] | tuple[str, ...] = ()) -> tuple[str, str | None]:
    """A provider's OAuth error code and description as they may be shown: the code when
    it is one (RFC 6749 5.2 characters, at most 64), the description with every value in
    `sent` replaced by "[sent value]", control characters removed and at most
    DESCRIPTION_MAX characters."""
    code = error if isinstance(error, str) and _ERROR_CODE.match(error) else "invalid_error_code"
    if not isinstance(description, str) or not description.strip():
        return code, None
    text = description
    for value in sorted({v for v in sent if len(v) >= _SENT_MIN}, key=len, reverse=True):
        text = text.replace(value, "[sent value]")
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    if len(text) > DESCRIPTION_MAX:
        text = text[:DESCRIPTION_MAX] + f"... ({len(description)} characters in all)"
    return code, text


def _answer(response: httpx.Response, url: str, what: str,
            tolerate: set[str], sent: list[str]) -> dict[str, Any]:
    status = response.status_code
    if status >= 500:
        raise ProviderUnreachable(f"{what} {url} answered HTTP {status}; trying again later")
    try:
        data = response.json() if response.content else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise OAuthError(f"{what} {url} answered HTTP {status} with no JSON object: is the "
                         "URL right?")
    error = data.get("error")
    if isinstance(error, str) and error not in tolerate:
        code, description = provider_text(error, data.get("error_description"), sent)
        text = f"{code}: {description}" if description else code
        raise ProviderRefused(f"{what} {url} refused: {text}", error=code,
                              description=description)
    if status >= 400 and error is None:
        raise OAuthError(f"{what} {url} answered HTTP {status} without an OAuth error")
    return data
