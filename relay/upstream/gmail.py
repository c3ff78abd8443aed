"""The Gmail API: `POST {gmail_url}/upload/gmail/v1/users/{mailbox}/messages/send?uploadType=media`.

The simple ("media") upload of `users.messages.send`: the MIME message as it is,
`Content-Type: message/rfc822`, at most 35 MB (GMAIL_LIMIT); Google answers 200 with
the Message resource ({id, threadId, labelIds}). The token has the scope
https://www.googleapis.com/auth/gmail.send. The shared machinery (token, 401,
429/5xx with Retry-After, timeouts) is relay.upstream.http_api; here is what
Google's other answers mean (its error body: {"error": {"code", "message",
"errors": [{"reason"}], "status"}}): 403 with a rate-limit reason is deferred like
429; 403 insufficientPermissions or "Delegation denied", 400, 404 and 413 fail the
message, with what to change. `check --connect` reads `GET
/gmail/v1/users/{mailbox}/profile`.
"""

from __future__ import annotations

import httpx

from relay.errors import DeliveryFailure, PermanentFailure, TemporaryFailure
from relay.upstream.http_client import Request, error_body, mailbox_path, said

GMAIL_LIMIT = 35 * 1024 * 1024
"""The largest message the media upload of messages.send takes: 35 MB."""
SCOPE = "https://www.googleapis.com/auth/gmail.send"
_RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "dailyLimitExceeded",
                           "quotaExceeded"})


def reason(response: httpx.Response) -> str:
    """The first errors[].reason of Google's error body, "" without one."""
    errors = error_body(response).get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("reason", ""))
    return ""


class Gmail:
    """The Gmail API's messages.send (relay.upstream.http_api.Api)."""

    title = "the Gmail API"
    limit = GMAIL_LIMIT

    def send(self, data: bytes, mailbox: str) -> Request:
        return Request("POST", f"/upload/gmail/v1/users/{mailbox_path(mailbox)}/messages/send"
                               "?uploadType=media", {"Content-Type": "message/rfc822"}, data)

    def sent(self, response: httpx.Response, mailbox: str) -> str | None:
        if response.status_code != 200:
            return None
        try:
            message = response.json()
        except ValueError:
            message = None
        if not isinstance(message, dict) or not message.get("id"):
            return None
        return f"200 OK: Gmail message id {message['id']} (sent as {mailbox})"

    def failure(self, response: httpx.Response, label: str, key: str,
                mailbox: str) -> DeliveryFailure:
        status, why = response.status_code, reason(response)
        detail = " ".join(p for p in (why, said(response)) if p)
        text = f"{label} answered HTTP {status}" + (f" ({detail})" if detail else "")
        if status == 200:
            return TemporaryFailure(f"{label} answered 200 without a Message (no id): not "
                                    "known to be sent; tried again later", stage="send")
        if status == 403 and why in _RATE_REASONS:
            return TemporaryFailure(f"{text} -- Google's sending limit for {mailbox}: the "
                                    "message stays queued and is tried again later",
                                    code=status, stage="send")
        if status == 403 and why == "insufficientPermissions":
            fix = (f"the token lacks the scope {SCOPE}: add it to the OAuth client's scopes "
                   "(and, for a service account, to its domain-wide delegation in the Admin "
                   "console), then sign in again")
        elif status == 403 and "delegation denied" in said(response).lower():
            fix = (f"the token is for another account, which may not send as {mailbox} "
                   "(delegation denied): sign in as that mailbox, or set system_account."
                   f"address (or {key}.oauth.username) to the account the token is for")
        elif status == 403:
            fix = (f"Google does not let this token send as {mailbox}: check the Gmail API is "
                   "enabled for the project and the account may use Gmail")
        elif status == 404:
            fix = f"Google knows no mailbox {mailbox}: check system_account.address"
        elif status == 413:
            fix = "the message is too large for the Gmail API (its limit is 35 MB)"
        else:
            fix = "Google refused the message as it is"
        return PermanentFailure(f"{text} -- {fix}", code=status, stage="send")

    def probe(self, mailbox: str) -> Request:
        return Request("GET", f"/gmail/v1/users/{mailbox_path(mailbox)}/profile",
                       {"Accept": "application/json"}, b"")

    def probed(self, response: httpx.Response, mailbox: str) -> tuple[bool, str]:
        """What `check --connect` says of the profile look-up: (passed, text)."""
        status = response.status_code
        if status == 200:
            try:
                found = response.json()
            except ValueError:
                found = {}
            return True, f"mailbox found: {found.get('emailAddress', '?')}"
        if status == 403 and reason(response) == "insufficientPermissions":
            return True, (f"HTTP 403 insufficientPermissions: the token's scope ({SCOPE}) "
                          "does not allow reading the profile, which sending does not need: "
                          "sending may still work; `send-test` shows it")
        return False, f"FAILED: HTTP {status} {reason(response)} {said(response)}".rstrip()
