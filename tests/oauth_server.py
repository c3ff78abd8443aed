"""A real OAuth 2.0 authorization server for the tests: aiohttp on 127.0.0.1, in its own thread.

So the relay (in the test process or as `sysmail-relay serve`), the `oauth authorize`
command and Dovecot's `oauth2` passdb all reach it over HTTP, as they would reach
Google or Microsoft. Endpoints:

- `GET /authorize`: authorization code with PKCE (S256 only), redirect to the
  client's loopback URI; signs in as `user` at once, or answers `access_denied`
  when `deny_consent` is set.
- `POST /token`: `authorization_code` (single use: a replayed code is refused and
  the tokens it gave are revoked), `refresh_token` (rotated when `rotate`),
  the device grant, `client_credentials`; `invalid_grant` for anything revoked,
  expired or replayed; `invalid_client` for a wrong client secret. Clients
  authenticate with `client_secret_basic`, `client_secret_post` or, for those with a
  certificate in `jwt.certificates`, `private_key_jwt` (`client_auth` records which);
  the JWT bearer grant serves the service accounts in `jwt.service_accounts` (the
  checks of both assertions: tests/oauth_jwt.py).
- `POST /device` (RFC 8628) and `GET /device/verify?user_code=...` (the "browser"
  that approves a code).
- `POST /introspect` (RFC 7662) for Dovecot, whose oauth2 passdb wants the scope
  `smtp`: a token carrying what the real SMTP servers take (Exchange Online's
  application permission `SMTP.SendAsApp`, Gmail's `https://mail.google.com/`) is
  reported with `smtp` added. `POST /revoke` (RFC 7009).

Lifetimes (`access_ttl`, `refresh_ttl`) and switches are attributes a test sets;
`stop()` takes the server off the network and `start()` brings it back on the
same port. `events` records every token request as "grant result".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit

from aiohttp import web

from tests.oauth_jwt import CLIENT_ASSERTION_TYPE, JWT_BEARER, Checks

CLIENT_ID = "relay-test-client"
CLIENT_SECRET = "relay-test-client-secret"
PUBLIC_CLIENT_ID = "relay-public-client"  # no secret: PKCE only
DOVECOT_CLIENT_ID = "dovecot"
DOVECOT_CLIENT_SECRET = "dovecot-introspection-secret"
USER = "notify@example.com"
SCOPE = "smtp offline_access"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SMTP_SCOPES = {"SMTP.SendAsApp", "https://mail.google.com/"}
"""What Exchange Online's and Gmail's SMTP take, reported to Dovecot as `smtp`."""


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    user: str
    expires_at: float
    used: bool = False
    issued: list[str] = field(default_factory=list)  # refresh tokens it gave


@dataclass
class _Refresh:
    client_id: str
    scope: str
    user: str
    expires_at: float | None
    active: bool = True


@dataclass
class _Access:
    client_id: str
    scope: str
    user: str
    expires_at: float
    refresh: str | None
    active: bool = True


@dataclass
class _Device:
    client_id: str
    scope: str
    user_code: str
    expires_at: float
    approved: bool = False
    denied: bool = False


class AuthServer:
    """The authorization server. Attributes are the knobs; `events` is what happened."""

    def __init__(self, user: str = USER) -> None:
        self.clients: dict[str, str | None] = {
            CLIENT_ID: CLIENT_SECRET, PUBLIC_CLIENT_ID: None,
            DOVECOT_CLIENT_ID: DOVECOT_CLIENT_SECRET}
        self.user = user
        self.access_ttl = 3600
        self.refresh_ttl: int | None = None
        self.rotate = True
        self.deny_consent = False
        self.issue_id_token = True
        self.device_interval = 1
        self.events: list[str] = []
        self.authorize_requests: list[dict[str, str]] = []
        self.introspections: list[bool] = []
        self.client_auth: list[str] = []  # how each token request authenticated its client
        self.app_permissions: dict[str, set[str]] = {}
        """Application permissions admin consent granted (SMTP.SendAsApp): a client
        credentials token for ".../.default" carries them, as Entra ID's `roles`."""
        self.jwt = Checks(users={user})
        self.port = 0
        self._lock = threading.Lock()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._access: dict[str, _Access] = {}
        self._devices: dict[str, _Device] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="oauth-server",
                                        daemon=True)
        self._thread.start()
        app = web.Application()
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/device", self._device)
        app.router.add_get("/device/verify", self._device_verify)
        app.router.add_post("/introspect", self._introspect)
        app.router.add_post("/revoke", self._revoke)
        self._runner = web.AppRunner(app, access_log=None)
        self._call(self._runner.setup())
        self._site: web.TCPSite | None = None

    # --- running ------------------------------------------------------------------------

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def start(self) -> AuthServer:
        if self._site is None:
            self._call(self._start_site())
        return self

    async def _start_site(self) -> None:
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        self._site = site

    def stop(self) -> None:
        """Off the network ("provider down"); `start()` comes back on the same port."""
        if self._site is not None:
            site, self._site = self._site, None
            self._call(self._stop_site(site))

    async def _stop_site(self, site: web.TCPSite) -> None:
        await site.stop()
        server = self._runner.server
        assert server is not None
        for handler in server.connections:  # kept-alive clients (Dovecot) lose theirs too
            handler.force_close()
            if handler.transport is not None:
                handler.transport.close()

    @property
    def running(self) -> bool:
        return self._site is not None

    def close(self) -> None:
        self.stop()
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def reset(self) -> None:
        """Back to the defaults, every token forgotten, listening."""
        with self._lock:
            self.user = USER
            self.access_ttl, self.refresh_ttl, self.rotate = 3600, None, True
            self.deny_consent, self.issue_id_token, self.device_interval = False, True, 1
            self.events.clear()
            self.authorize_requests.clear()
            self.introspections.clear()
            self.client_auth.clear()
            self.app_permissions.clear()
            self.jwt = Checks(users={USER})
            for table in (self._codes, self._refresh, self._access, self._devices):
                table.clear()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- what tests do to it ----------------------------------------------------------------

    def revoke_user(self, user: str = USER) -> None:
        """Revoke every refresh and access token of `user` (password changed, consent removed)."""
        with self._lock:
            tokens: list[_Refresh | _Access] = [*self._refresh.values(), *self._access.values()]
            for token in tokens:
                if token.user == user:
                    token.active = False

    def expire_access_tokens(self) -> None:
        """Every access token stops working now, while its holder still thinks it valid."""
        with self._lock:
            for access in self._access.values():
                access.active = False

    def refresh_token_active(self, token: str) -> bool:
        with self._lock:
            found = self._refresh.get(token)
            return found is not None and found.active

    def issued(self) -> list[str]:
        """Every token and code handed out so far (to prove none of them leaks)."""
        with self._lock:
            return [*self._codes, *self._refresh, *self._access, *self._devices]

    def approve_device(self, user_code: str) -> None:
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code:
                    device.approved = True
                    return
        raise KeyError(user_code)

    def count(self, event: str) -> int:
        with self._lock:
            return sum(1 for e in self.events if e == event)

    # --- endpoints --------------------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        with self._lock:
            self.authorize_requests.append(q)
        redirect = q.get("redirect_uri", "")
        if q.get("client_id") not in self.clients or not redirect.startswith("http"):
            return web.Response(status=400, text="unknown client or no redirect_uri")
        state = {"state": q["state"]} if "state" in q else {}
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" \
                or not q.get("code_challenge"):
            return _redirect(redirect, error="invalid_request",
                             error_description="PKCE with S256 is required", **state)
        if self.deny_consent:
            return _redirect(redirect, error="access_denied",
                             error_description="The user denied access", **state)
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Code(q["client_id"], redirect, q["code_challenge"],
                                      q.get("scope", ""), self.user, time.time() + 120)
        return _redirect(redirect, code=code, **state)

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        grant = form.get("grant_type", "")
        if grant == JWT_BEARER:  # a service account: its signed assertion is all it sends
            return self._bearer_grant(form)
        client_id, problem = self._authenticate(request, form)
        if client_id is None:
            self._event(grant, "invalid_client")
            return _error("invalid_client", problem or "client authentication failed", 401)
        handlers = {"authorization_code": self._code_grant, "refresh_token": self._refresh_grant,
                    DEVICE_GRANT: self._device_grant,
                    "client_credentials": self._client_credentials}
        handler = handlers.get(grant)
        if handler is None:
            return _error("unsupported_grant_type", grant)
        with self._lock:
            result = handler(client_id, {k: str(v) for k, v in form.items()})
        self._event(grant, str(result.get("error", "ok")))
        if "error" in result:
            return _error(str(result["error"]), str(result.get("error_description", "")))
        return web.json_response(result, headers={"Cache-Control": "no-store"})

    def _authenticate(self, request: web.Request,
                      form: dict[str, str]) -> tuple[str | None, str | None]:
        """(the client, authenticated by its secret or its certificate's assertion, or
        None; why not)."""
        if "client_assertion_type" not in form:
            method = "client_secret_basic" if "Authorization" in request.headers else \
                "client_secret_post" if "client_secret" in form else "none"
            with self._lock:
                self.client_auth.append(method)
            return _client(request, form, self.clients), None
        with self._lock:
            self.client_auth.append("private_key_jwt")
            if form["client_assertion_type"] != CLIENT_ASSERTION_TYPE:
                return None, "unknown client_assertion_type"
            client_id, problem = self.jwt.client(form.get("client_id", ""),
                                                 form.get("client_assertion", ""),
                                                 f"{self.url}/token")
        return (None, problem) if problem else (client_id, None)

    def _bearer_grant(self, form: dict[str, str]) -> web.Response:
        with self._lock:
            found = self.jwt.bearer(form.get("assertion", ""), f"{self.url}/token")
            result = found if isinstance(found, dict) else self._issue(
                found[0], found[2], found[1], refresh=False)
        self._event(JWT_BEARER, str(result.get("error", "ok")))
        if "error" in result:
            return _error(str(result["error"]), str(result.get("error_description", "")))
        return web.json_response(result, headers={"Cache-Control": "no-store"})

    def _event(self, grant: str, result: str) -> None:
        with self._lock:
            self.events.append(f"{grant} {result}")

    def _code_grant(self, client_id: str, form: dict[str, str]) -> dict[str, object]:
        code = self._codes.get(form.get("code", ""))
        if code is None or code.expires_at < time.time():
            return {"error": "invalid_grant", "error_description": "unknown or expired code"}
        if code.used:  # RFC 6749 4.1.2: refuse, and revoke what the code gave
            for refresh in code.issued:
                self._revoke_family(refresh)
            return {"error": "invalid_grant", "error_description": "code already used"}
        code.used = True
        if code.client_id != client_id or code.redirect_uri != form.get("redirect_uri"):
            return {"error": "invalid_grant", "error_description": "client or redirect_uri "
                                                                   "does not match"}
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if digest.rstrip(b"=").decode() != code.challenge:
            return {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        tokens = self._issue(client_id, code.scope, code.user, refresh=True)
        code.issued.append(str(tokens["refresh_token"]))
        return tokens

    def _refresh_grant(self, client_id: str, form: dict[str, str]) -> dict[str, object]:
        old = form.get("refresh_token", "")
        refresh = self._refresh.get(old)
        expired = refresh is not None and refresh.expires_at is not None \
            and refresh.expires_at < time.time()
        if refresh is None or not refresh.active or expired:
            return {"error": "invalid_grant",
                    "error_description": "refresh token revoked, expired or unknown"}
        if refresh.client_id != client_id:
            return {"error": "invalid_grant", "error_description": "issued to another client"}
        if not self.rotate:
            return self._issue(client_id, refresh.scope, refresh.user, refresh=False,
                               family=old)
        refresh.active = False
        for access in self._access.values():
            if access.refresh == old:
                access.refresh = None
        return self._issue(client_id, refresh.scope, refresh.user, refresh=True)

    def _device_grant(self, client_id: str, form: dict[str, str]) -> dict[str, object]:
        device = self._devices.get(form.get("device_code", ""))
        if device is None or device.client_id != client_id:
            return {"error": "invalid_grant", "error_description": "unknown device_code"}
        if device.expires_at < time.time():
            return {"error": "expired_token"}
        if device.denied:
            return {"error": "access_denied", "error_description": "The user denied access"}
        if not device.approved:
            return {"error": "authorization_pending"}
        del self._devices[form["device_code"]]
        return self._issue(client_id, device.scope, self.user, refresh=True)

    def _client_credentials(self, client_id: str, form: dict[str, str]) -> dict[str, object]:
        if self.clients.get(client_id) is None and client_id not in self.jwt.certificates:
            return {"error": "unauthorized_client",
                    "error_description": "client_credentials needs a confidential client"}
        scope = form.get("scope", "")
        if scope.endswith("/.default"):
            scope = " ".join(sorted(self.app_permissions.get(client_id, set())))
        return self._issue(client_id, scope, self.user, refresh=False)

    def _issue(self, client_id: str, scope: str, user: str, *, refresh: bool,
               family: str | None = None) -> dict[str, object]:
        now = time.time()
        access = "at-" + secrets.token_urlsafe(24)
        result: dict[str, object] = {"access_token": access, "token_type": "Bearer",
                                     "expires_in": self.access_ttl, "scope": scope}
        if refresh:
            family = "rt-" + secrets.token_urlsafe(24)
            expires = now + self.refresh_ttl if self.refresh_ttl else None
            self._refresh[family] = _Refresh(client_id, scope, user, expires)
            result["refresh_token"] = family
        self._access[access] = _Access(client_id, scope, user, now + self.access_ttl, family)
        if self.issue_id_token and "openid" in scope.split():
            result["id_token"] = _unsigned_jwt({"sub": user, "email": user, "aud": client_id})
        return result

    def _revoke_family(self, refresh: str) -> None:
        if refresh in self._refresh:
            self._refresh[refresh].active = False
        for access in self._access.values():
            if access.refresh == refresh:
                access.active = False

    async def _device(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        client_id = _client(request, form, self.clients)
        if client_id is None:
            return _error("invalid_client", "client authentication failed", 401)
        device_code = secrets.token_urlsafe(24)
        user_code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
        with self._lock:
            self._devices[device_code] = _Device(client_id, str(form.get("scope", "")),
                                                 user_code, time.time() + 600,
                                                 denied=self.deny_consent)
        verify = f"{self.url}/device/verify"
        return web.json_response({
            "device_code": device_code, "user_code": user_code, "verification_uri": verify,
            "verification_uri_complete": f"{verify}?user_code={user_code}",
            "expires_in": 600, "interval": self.device_interval})

    async def _device_verify(self, request: web.Request) -> web.Response:
        try:
            self.approve_device(request.query.get("user_code", ""))
        except KeyError:
            return web.Response(status=404, text="unknown code")
        return web.Response(text="Device approved. You can close this window.")

    async def _introspect(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        token = str(form.get("token", ""))
        with self._lock:
            access = self._access.get(token)
            active = access is not None and access.active and access.expires_at > time.time()
            self.introspections.append(active)
        if not active or access is None:
            return web.json_response({"active": False})
        scopes = access.scope.split()
        if SMTP_SCOPES & set(scopes) and "smtp" not in scopes:
            scopes.append("smtp")
        return web.json_response({
            "active": True, "username": access.user, "scope": " ".join(scopes),
            "client_id": access.client_id, "exp": int(access.expires_at),
            "token_type": "Bearer"})

    async def _revoke(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        if _client(request, form, self.clients) is None:
            return _error("invalid_client", "client authentication failed", 401)
        token = str(form.get("token", ""))
        self._event("revoke", "ok")
        with self._lock:
            if token in self._refresh:
                self._revoke_family(token)
            elif token in self._access:
                self._access[token].active = False
        return web.Response(text="")


def _client(request: web.Request, form: Mapping[str, object],
            clients: dict[str, str | None]) -> str | None:
    """The authenticated client id (HTTP Basic, secret in the body, or a public client)."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
    else:
        client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
    if client_id not in clients:
        return None
    expected = clients[client_id]
    return client_id if expected is None or secrets.compare_digest(secret, expected) else None


def _redirect(uri: str, **params: str) -> web.Response:
    joiner = "&" if "?" in uri else "?"
    return web.Response(status=302, headers={"Location": uri + joiner + urlencode(params)})


def _error(error: str, description: str, status: int = 400) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _unsigned_jwt(claims: dict[str, str]) -> str:
    def part(data: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object) -> None:
        return None


def redirect_query(url: str) -> dict[str, str]:
    """Play the browser at the authorization endpoint: the query of the redirect it answers
    with (code and state, or error). urllib, so that the relay's httpx is all httpx logs."""
    try:
        urllib.request.build_opener(_NoRedirect).open(url, timeout=10).close()
    except urllib.error.HTTPError as e:
        location = e.headers.get("Location")
        e.close()
        if e.code == 302 and location:
            return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        raise
    raise AssertionError(f"{url} did not redirect")
