"""Strict stand-ins for Microsoft Graph's sendMail and the Gmail API's messages.send.

Written from Microsoft's and Google's published REST reference, NOT checked against
the real services: no test here reaches graph.microsoft.com or gmail.googleapis.com.
aiohttp on 127.0.0.1 in its own thread (like tests/oauth_server.py), so the relay, in
the test's process or as `sysmail-relay serve`, reaches it over real HTTP (HTTPS when
given a TLS context).

Graph (`GraphServer`):
- `POST /v1.0/users/{id}/sendMail`: `Content-Type: text/plain`, the body the MIME
  message in base64 (strictly decoded), at most 4 MB (413 beyond); 202 Accepted with an
  empty body. Errors as Graph writes them: `{"error": {"code", "message"}}`.
- `GET /v1.0/users/{id}?$select=id,mail`: the user, or 403 when the app may not read
  users (`can_read_users = False`), or 404.

Gmail (`GmailServer`):
- `POST /upload/gmail/v1/users/{id}/messages/send?uploadType=media`:
  `Content-Type: message/rfc822`, at most 35 MB; 200 with a Message `{id, threadId,
  labelIds}`. Errors as Google writes them: `{"error": {"code", "message",
  "errors": [{"message", "domain", "reason"}], "status"}}`. The token must carry the
  gmail.send scope (403 insufficientPermissions) and be the mailbox's own (403
  "Delegation denied").
- `GET /gmail/v1/users/{id}/profile`: 403 insufficientPermissions for a gmail.send
  token (as Google answers), else the profile.

Both check the bearer token against the test OAuth server's `/introspect` (401 when it
is not active), refuse an unknown mailbox (404), and parse the message's To, Cc and
Bcc as the services do: `deliveries` records who each accepted request reached and
what the others see (the message without its Bcc field). `fail_next(status, times)`
makes the next requests answer 429, 503, 504, 401, 403, 404, 400 or 413 with the API's
error body (`retry_after` sets Retry-After); `answers` lists every status sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import ssl
import threading
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.utils import getaddresses
from typing import ClassVar

import aiohttp
from aiohttp import web

GRAPH_LIMIT = 4 * 1024 * 1024
GMAIL_LIMIT = 35 * 1024 * 1024
GRAPH_SCOPES = {"Mail.Send", "https://graph.microsoft.com/Mail.Send"}
"""What lets a token send: the Mail.Send application permission an admin consented to
(a `.default` token carries it, as Entra ID's `roles`: tests/oauth_server.py's
`app_permissions`), or a person's delegated Mail.Send."""
GMAIL_SCOPES = {"https://www.googleapis.com/auth/gmail.send", "https://mail.google.com/"}


@dataclass
class Delivery:
    """One message an API accepted."""

    mailbox: str
    """The {id} of the URL: the mailbox it was sent from."""
    sender: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    seen: bytes
    """The message as its recipients get it (no Bcc field)."""

    @property
    def recipients(self) -> set[str]:
        return {a.lower() for a in [*self.to, *self.cc, *self.bcc]}


@dataclass
class _Failure:
    status: int
    code: str | None
    times: int


class _ApiServer:
    """What both stand-ins share: the thread, the token check, the switches."""

    title = ""

    def __init__(self, introspect_url: str, mailboxes: set[str],
                 tls: ssl.SSLContext | None = None) -> None:
        self.introspect_url = introspect_url
        self.tls = tls
        self.mailboxes = {m.lower() for m in mailboxes}
        self.deliveries: list[Delivery] = []
        self.answers: list[int] = []
        self.retry_after: str | None = None
        self.port = 0
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.title,
                                        daemon=True)
        self._thread.start()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        self._call(self._runner.setup())
        self._call(self._start())

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def _drop_connections(self) -> None:
        """Kept-alive clients (the relay's pool) lose theirs too, before the loop closes."""
        server = self._runner.server
        if server is None:
            return
        for handler in list(server.connections):
            handler.force_close()
            if handler.transport is not None:
                handler.transport.abort()  # at once: a TLS close would wait for the peer
        await asyncio.sleep(0)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._call(self._drop_connections())
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def reset(self) -> None:
        with self._lock:
            self.deliveries.clear()
            self.answers.clear()
            self._failures.clear()
            self.retry_after = None

    def fail_next(self, status: int, times: int = 1, code: str | None = None) -> None:
        """The next `times` send requests answer `status` (with `code` as the error code
        or reason, else the API's usual one for that status)."""
        with self._lock:
            self._failures.append(_Failure(status, code, times))

    def delivered(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def _failure(self) -> _Failure | None:
        with self._lock:
            if not self._failures:
                return None
            failure = self._failures[0]
            failure.times -= 1
            if failure.times <= 0:
                self._failures.pop(0)
            return failure

    def _answer(self, response: web.Response) -> web.Response:
        with self._lock:
            self.answers.append(response.status)
        return response

    async def _token(self, request: web.Request) -> dict[str, object] | None:
        """The introspected token of `Authorization: Bearer ...`, None when not active."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return None
        async with aiohttp.ClientSession() as http, \
                http.post(self.introspect_url, data={"token": header[7:].strip()}) as answer:
            data = await answer.json()
        return data if isinstance(data, dict) and data.get("active") else None

    def _record(self, mailbox: str, raw: bytes) -> Delivery | None:
        """Parse the message as the services do; None when it names no recipient."""
        msg = message_from_bytes(raw, policy=policy.compat32)

        def addresses(name: str) -> list[str]:
            return [a for _, a in getaddresses(msg.get_all(name, [])) if a]

        to, cc, bcc = addresses("To"), addresses("Cc"), addresses("Bcc")
        if not (to or cc or bcc):
            return None
        del msg["Bcc"]
        sender = (getaddresses(msg.get_all("From", [])) or [("", "")])[0][1]
        delivery = Delivery(mailbox, sender, to, cc, bcc, msg.as_bytes())
        with self._lock:
            self.deliveries.append(delivery)
        return delivery


class GraphServer(_ApiServer):
    """Microsoft Graph: sendMail (MIME) and the user look-up."""

    title = "graph-server"
    _CODES: ClassVar[dict[int, str]] = {
        400: "ErrorInvalidRecipients", 401: "InvalidAuthenticationToken",
              403: "ErrorAccessDenied", 404: "ErrorInvalidUser",
              413: "ErrorMessageSizeExceeded", 429: "ApplicationThrottled",
              503: "ServiceUnavailable", 504: "GatewayTimeout"}

    def __init__(self, introspect_url: str, mailboxes: set[str],
                 tls: ssl.SSLContext | None = None) -> None:
        self.can_read_users = True
        super().__init__(introspect_url, mailboxes, tls)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1.0/users/{id}/sendMail", self._send_mail)
        app.router.add_get("/v1.0/users/{id}", self._user)

    def _error(self, status: int, code: str, message: str) -> web.Response:
        headers = {"request-id": secrets.token_hex(8)}
        if status in (429, 503, 504) and self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="", error="invalid_token"'
        body = {"error": {"code": code, "message": message,
                          "innerError": {"request-id": headers["request-id"]}}}
        return self._answer(web.json_response(body, status=status, headers=headers))

    async def _send_mail(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        if token is None:
            return self._error(401, "InvalidAuthenticationToken",
                               "Access token validation failure. Invalid audience.")
        if not GRAPH_SCOPES & set(str(token.get("scope", "")).split()):
            return self._error(403, "ErrorAccessDenied", "Access is denied. Check credentials "
                                                         "and try again.")
        failure = self._failure()
        if failure is not None:
            return self._error(failure.status, failure.code or self._CODES[failure.status],
                               f"switched to answer {failure.status}")
        mailbox = request.match_info["id"]
        if mailbox.lower() not in self.mailboxes:
            return self._error(404, "ErrorInvalidUser",
                               f"The requested user '{mailbox}' is invalid.")
        if request.content_type != "text/plain":
            return self._error(400, "ErrorMimeContentInvalid",
                               "MIME content must be sent as text/plain (base64).")
        body = await request.read()
        if len(body) > GRAPH_LIMIT:
            return self._error(413, "ErrorMessageSizeExceeded",
                               "The message exceeds the maximum supported size.")
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return self._error(400, "ErrorMimeContentInvalidBase64String",
                               "Invalid base64 string for MIME content.")
        if self._record(mailbox, raw) is None:
            return self._error(400, "ErrorInvalidRecipients",
                               "At least one recipient is not valid.")
        return self._answer(web.Response(status=202, headers={
            "request-id": secrets.token_hex(8)}))

    async def _user(self, request: web.Request) -> web.Response:
        if await self._token(request) is None:
            return self._error(401, "InvalidAuthenticationToken", "Access token validation "
                                                                  "failure.")
        if not self.can_read_users:
            return self._error(403, "Authorization_RequestDenied",
                               "Insufficient privileges to complete the operation.")
        mailbox = request.match_info["id"]
        if mailbox.lower() not in self.mailboxes:
            return self._error(404, "Request_ResourceNotFound",
                               f"Resource '{mailbox}' does not exist.")
        select = request.query.get("$select", "")
        user = {"id": "00000000-0000-0000-0000-" + secrets.token_hex(6), "mail": mailbox}
        return self._answer(web.json_response(
            {k: v for k, v in user.items() if not select or k in select.split(",")}))


class GmailServer(_ApiServer):
    """The Gmail API: messages.send (media upload) and the profile."""

    title = "gmail-server"
    _REASONS: ClassVar[dict[int, tuple[str, str]]] = {400: ("invalidArgument", "INVALID_ARGUMENT"),
                401: ("authError", "UNAUTHENTICATED"),
                403: ("insufficientPermissions", "PERMISSION_DENIED"),
                404: ("notFound", "NOT_FOUND"), 413: ("uploadTooLarge", "FAILED_PRECONDITION"),
                429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED"),
                500: ("backendError", "INTERNAL"), 503: ("backendError", "UNAVAILABLE"),
                504: ("backendError", "DEADLINE_EXCEEDED")}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/upload/gmail/v1/users/{id}/messages/send", self._send)
        app.router.add_get("/gmail/v1/users/{id}/profile", self._profile)

    def _error(self, status: int, reason: str | None, message: str) -> web.Response:
        found, state = self._REASONS.get(status, ("failedPrecondition", "FAILED_PRECONDITION"))
        headers = {}
        limited = status in (429, 503, 504) or reason in ("rateLimitExceeded",
                                                          "userRateLimitExceeded")
        if limited and self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
        body = {"error": {"code": status, "message": message, "status": state, "errors": [
            {"message": message, "domain": "global", "reason": reason or found}]}}
        return self._answer(web.json_response(body, status=status, headers=headers))

    async def _authorised(self, request: web.Request) -> tuple[dict[str, object] | None,
                                                              web.Response | None]:
        token = await self._token(request)
        if token is None:
            return None, self._error(401, "authError", "Request had invalid authentication "
                                                       "credentials.")
        mailbox = request.match_info["id"]
        user = str(token.get("username", "")).lower()
        if mailbox != "me" and mailbox.lower() not in self.mailboxes:
            return None, self._error(404, "notFound", "Requested entity was not found.")
        if mailbox != "me" and mailbox.lower() != user:
            return None, self._error(403, "forbidden", f"Delegation denied for {user}")
        return token, None

    async def _send(self, request: web.Request) -> web.Response:
        token, refused = await self._authorised(request)
        if refused is not None:
            return refused
        assert token is not None
        if not GMAIL_SCOPES & set(str(token.get("scope", "")).split()):
            return self._error(403, "insufficientPermissions",
                               "Request had insufficient authentication scopes.")
        failure = self._failure()
        if failure is not None:
            return self._error(failure.status, failure.code, f"switched to answer "
                                                             f"{failure.status}")
        if request.query.get("uploadType") != "media":
            return self._error(400, "invalidArgument", "uploadType must be media here")
        if request.content_type != "message/rfc822":
            return self._error(400, "badContent", f"Media type '{request.content_type}' is "
                                                  "not supported.")
        raw = await request.read()
        if len(raw) > GMAIL_LIMIT:
            return self._error(413, "uploadTooLarge", "Request payload size exceeds the "
                                                      "limit: 36700160 bytes.")
        mailbox = request.match_info["id"]
        if self._record(mailbox, raw) is None:
            return self._error(400, "invalidArgument", "Recipient address required")
        message_id = secrets.token_hex(8)
        return self._answer(web.json_response({"id": message_id, "threadId": message_id,
                                               "labelIds": ["SENT"]}))

    async def _profile(self, request: web.Request) -> web.Response:
        token, refused = await self._authorised(request)
        if refused is not None:
            return refused
        assert token is not None
        if "https://mail.google.com/" not in str(token.get("scope", "")).split():
            return self._error(403, "insufficientPermissions",
                               "Request had insufficient authentication scopes.")
        return self._answer(web.json_response({"emailAddress": request.match_info["id"],
                                               "messagesTotal": 0, "threadsTotal": 0,
                                               "historyId": "1"}))
