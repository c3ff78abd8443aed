"""Microsoft Graph: `POST {graph_url}/v1.0/users/{mailbox}/sendMail` with the MIME message.

The documented MIME form of sendMail: the whole message base64-encoded as the body,
`Content-Type: text/plain`; Graph answers 202 Accepted with an empty body. The
request body may be at most 4 MB (GRAPH_LIMIT, the base64 text): a larger message
fails before anything is sent, or goes to `fallback_server`. The token is app-only
(client credentials, scope https://graph.microsoft.com/.default, the Mail.Send
application permission) or delegated (Mail.Send). The shared machinery (token, 401,
429/503/504 with Retry-After, timeouts) is relay.upstream.http_api; here is what
Graph's other answers mean (its error body: {"error": {"code", "message"}}), and the
harmless call of `check --connect`: `GET /v1.0/users/{mailbox}?$select=id,mail`.
"""

from __future__ import annotations

import base64

import httpx

from relay.errors import DeliveryFailure, PermanentFailure
from relay.upstream.http_client import Request, error_code, mailbox_path, said

GRAPH_LIMIT = 4 * 1024 * 1024
"""The largest sendMail request body: 4 MB of base64 (a MIME message of about 3 MB)."""

_PERMISSION_FIX = (
    "the app lacks the Mail.Send permission with admin consent (Entra ID: App "
    "registrations > the app > API permissions > Microsoft Graph > Application "
    "permissions > Mail.Send, then \"Grant admin consent\"; Delegated Mail.Send for a "
    "signed-in user), or an Exchange application access policy or RBAC for Applications "
    "scope leaves {mailbox} out (Test-ApplicationAccessPolicy / "
    "Test-ServicePrincipalAuthorization)")


class Graph:
    """Microsoft Graph's sendMail (relay.upstream.http_api.Api)."""

    title = "Microsoft Graph"
    limit = GRAPH_LIMIT

    def send(self, data: bytes, mailbox: str) -> Request:
        return Request("POST", f"/v1.0/users/{mailbox_path(mailbox)}/sendMail",
                       {"Content-Type": "text/plain"}, base64.b64encode(data))

    def sent(self, response: httpx.Response, mailbox: str) -> str | None:
        if response.status_code != 202:
            return None
        request_id = response.headers.get("request-id")
        return (f"202 Accepted by Microsoft Graph (sendMail as {mailbox}"
                f"{f', request-id {request_id}' if request_id else ''})")

    def failure(self, response: httpx.Response, label: str, key: str,
                mailbox: str) -> DeliveryFailure:
        status, code = response.status_code, error_code(response) or ""
        text = f"{label} answered HTTP {status}" + (f" {said(response)}" if said(response)
                                                    else "")
        if status == 403 and code == "ErrorSendAsDenied":
            fix = (f"the token's account or app may not send as {mailbox}: grant it Send As "
                   f"on that mailbox, or set system_account.address (or {key}.oauth.username) "
                   "to the mailbox the token is for")
        elif status == 403:
            fix = _PERMISSION_FIX.format(mailbox=mailbox)
        elif status == 404:
            fix = (f"Graph knows no mailbox {mailbox} in this tenant: system_account.address "
                   f"(or {key}.oauth.username) must be a mailbox of the tenant the app is "
                   "registered in (a user or shared mailbox with an Exchange Online licence)")
        elif status == 413:
            fix = "the request is too large for Graph (its limit is 4 MB)"
        elif status == 400:
            fix = "Graph refused the message as it is"
        else:
            fix = "Graph refused the message"
        return PermanentFailure(f"{text} -- {fix}", code=status, stage="send")

    def probe(self, mailbox: str) -> Request:
        return Request("GET", f"/v1.0/users/{mailbox_path(mailbox)}?$select=id,mail",
                       {"Accept": "application/json"}, b"")

    def probed(self, response: httpx.Response, mailbox: str) -> tuple[bool, str]:
        """What `check --connect` says of the mailbox look-up: (passed, text)."""
        status = response.status_code
        if status == 200:
            try:
                found = response.json()
            except ValueError:
                found = {}
            return True, (f"mailbox found: id {found.get('id', '?')}, mail "
                          f"{found.get('mail', '?')}")
        if status == 403:
            return True, (f"HTTP 403 {said(response)}: the app may not read users (that needs "
                          "User.Read.All), which sending does not need: sending may still "
                          "work; `send-test` shows it")
        if status == 404:
            return False, (f"FAILED: HTTP 404 {said(response)}: no mailbox {mailbox} in this "
                           "tenant; check system_account.address")
        return False, f"FAILED: HTTP {status} {said(response)}"
