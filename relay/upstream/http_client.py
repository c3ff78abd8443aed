"""One HTTP API request with a bearer token from relay.oauth, and what its answer says.

`Client` holds the server's `httpx.AsyncClient` (the server's TLS settings: ca_file,
tls_verify; its connections kept alive; at most `pool_size` of them) and sends a
`Request` with a token (`access_token`), bounded by the server's `timeout` (one more
`timeout` for each MiB sent). A 401 gets a new token (`fresh_token`) and one more
try; a second 401 is `Held` as not granted (the mail waits, it is not bounced). No
token, no answer: Held (not granted) or a TemporaryFailure that says what to check.
The helpers read the APIs' JSON error bodies ({"error": {"code", "message"}}) and
Retry-After. Used by relay.upstream.http_api (sending) and relay.upstream.probe.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

import httpx

from relay.errors import (
    Held,
    NotGranted,
    OAuthError,
    TemporaryFailure,
    TokenStoreError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from relay.settings import ServerSettings
from relay.upstream.message import DATA_RATE
from relay.upstream.network import tls_context
from relay.upstream.smtp_login import OAUTH_RECHECK

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth

log = logging.getLogger("relay.upstream")


@dataclass(frozen=True)
class Request:
    """One HTTP request to an API."""

    method: str
    path: str
    """After the API's base URL (`servers.NAME.graph_url` / `gmail_url`)."""
    headers: Mapping[str, str]
    content: bytes = b""


class Titled(Protocol):
    title: str
    """"Microsoft Graph", "the Gmail API"."""


def mailbox_path(address: str) -> str:
    """An address as one URL path segment."""
    return quote(address, safe="@")


def retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date: the seconds from `now`, default
    the current time, to it), None when absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Client:
    """An API's HTTP client with a bearer token: one request, 401 answered once."""

    def __init__(self, name: str, server: ServerSettings, api: Titled,
                 oauth: OAuth | None) -> None:
        self.name = name
        self.server = server
        self.api = api
        self.oauth = oauth
        self.key = f"servers.{name}"
        self.label = f"{name} ({api.title} at {server.api_url})"
        self.on_refused: Callable[[], None] | None = None
        """Called at every 401 (relay_auth_failures_total)."""
        self._http: httpx.AsyncClient | None = None

    @property
    def mailbox(self) -> str:
        """The mailbox the API sends from: oauth.username, else the system address."""
        assert self.oauth is not None and self.server.oauth is not None
        return self.oauth.username_for(self.name)

    def http(self) -> httpx.AsyncClient:
        """The server's client, made on first use (its TLS context reads ca_file)."""
        if self._http is None:
            context = tls_context(self.server, key=f"{self.key}.ca_file")
            self._http = httpx.AsyncClient(
                base_url=self.server.api_url, verify=context, timeout=self.server.timeout,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self.server.pool_size))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def token(self, rejected: str | None = None) -> str:
        """A bearer token; not granted: Held (the mail waits); the provider failing:
        TemporaryFailure."""
        if self.oauth is None or self.server.oauth is None:
            raise TemporaryFailure(f"{self.label}: OAuth is configured but not available "
                                   "here (internal error)", stage="OAuth token")
        client, user = self.server.oauth.client, self.mailbox
        stage = "OAuth token" if rejected is None else "OAuth refresh"
        try:
            if rejected is None:
                return await self.oauth.access_token(client, user)
            return await self.oauth.fresh_token(client, rejected, user)
        except (NotGranted, TokenStoreError) as e:
            fix = "" if "oauth authorize" in str(e) or isinstance(e, TokenStoreError) else (
                f"; sign in: `sysmail-relay oauth authorize {client}` (or the admin page's "
                "sign-in button)")
            raise Held(f"{self.label}: OAuth authorization Not granted for {user}: {e}{fix}",
                       stage=stage, retry_at=time.time() + OAUTH_RECHECK) from None
        except OAuthError as e:
            fix = "" if "oauth_clients." in str(e) else (
                f"; check oauth_clients.{client} (token_url, client_id, the secret) and that "
                "the provider can be reached from here")
            raise TemporaryFailure(f"{self.label}: no OAuth token for {user}: {e}{fix}",
                                   stage=stage) from None

    async def request(self, request: Request, stage: str) -> httpx.Response:
        """The request with a token; on 401 once more with a new token; a second 401 is
        Held (not granted). Any other answer is returned."""
        token = await self.token()
        response = await self._once(request, token, stage)
        if response.status_code != 401:
            return response
        if self.on_refused is not None:
            self.on_refused()
        log.info("%s refused the OAuth token for %s (HTTP 401 %s): getting a new one, trying "
                 "once more", self.label, self.mailbox, error_code(response) or "")
        token = await self.token(rejected=token)
        response = await self._once(request, token, stage)
        if response.status_code != 401:
            return response
        if self.on_refused is not None:
            self.on_refused()
        client = self.server.oauth.client if self.server.oauth else "?"
        raise Held(
            f"{self.label} answered HTTP 401 {error_code(response) or ''} twice, to a new "
            f"token too: OAuth authorization Not granted for {self.mailbox}; check that "
            f"oauth_clients.{client} has the API's permission with admin consent "
            f"({_PERMISSION.get(self.server.protocol, '')}) and that its tokens are for "
            "this API (scopes); the mail waits", stage="OAuth refresh",
            retry_at=time.time() + OAUTH_RECHECK)

    async def _once(self, request: Request, token: str, stage: str) -> httpx.Response:
        wait = self.server.timeout * (1 + len(request.content) // DATA_RATE)
        headers = {**request.headers, "Authorization": f"Bearer {token}"}
        try:
            return await self.http().request(request.method, request.path, headers=headers,
                                             content=request.content or None, timeout=wait)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"{self.label} did not answer {stage} within {wait:g} s; "
                                  f"trying again later (or raise {self.key}.timeout)",
                                  stage=stage) from None
        except httpx.TransportError as e:
            raise self._unreachable(e, stage) from None

    def _unreachable(self, error: httpx.TransportError, stage: str) -> TemporaryFailure:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        url_key = "graph_url" if self.server.protocol == "graph" else "gmail_url"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TemporaryFailure(
                f"the TLS certificate of {self.label} is not trusted: {cause.verify_message}; "
                f"add its CA with {self.key}.ca_file = \"/path/to/ca.pem\", or check "
                f"{self.key}.{url_key}", stage=stage)
        return UpstreamUnreachable(f"cannot reach {self.label}: {error or type(error).__name__}"
                                   f"; check {self.key}.{url_key} and that it can be reached "
                                   "from here", stage=stage)


_PERMISSION = {"graph": "Mail.Send", "gmail_api": "https://www.googleapis.com/auth/gmail.send"}


def error_code(response: httpx.Response) -> str | None:
    """The API's error code from its JSON error body ({"error": {"code": ...}})."""
    error = error_body(response)
    code = error.get("code")
    return str(code) if code is not None else None


def said(response: httpx.Response) -> str:
    """The API's error code and message, for a person: "Code: message", at most 300
    characters, without control characters; "" without a JSON error body."""
    error = error_body(response)
    text = ": ".join(str(error[k]) for k in ("code", "message") if error.get(k))
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]+", " ", text).split())
    return text if len(text) <= 300 else text[:300] + "..."


def error_body(response: httpx.Response) -> dict[str, object]:
    """The "error" object of a JSON error body, {} when there is none."""
    try:
        data = response.json()
    except ValueError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}
