"""The HTTP API upstreams (Graph, the Gmail API): one message, one request, its answer.

`ApiUpstream` implements `Upstream` for a server with protocol = "graph" or
"gmail_api". Per message: the pacing of the server (relay.upstream.pacing: rate_limit,
max_recipients_per_day, the pauses) is asked first; the recipients are put in the
headers (relay.upstream.recipients: exactly the envelope's); a message over the API's
size limit fails permanently before anything is sent, or goes to `fallback_server`
when one is named; then one POST with a bearer token from relay.oauth
(`access_token`). At most `pool_size` requests run at once, over one
`httpx.AsyncClient` (its connections are kept alive), each bounded by the server's
`timeout` (one more `timeout` for each MiB sent).

The answer becomes an `Outcome` for every recipient, or a failure of the whole
message. Shared by both APIs: 401 gets a new token and one more try, a second 401
holds the mail as "not granted" (relay.upstream.http_client); 429, 503 and 504, and
any other 5xx, defer the message, and the server is paused for its Retry-After
(`not_before()`); a timeout or a connection that fails defers it. The rest is the
API's own (relay.upstream.graph, relay.upstream.gmail: `Api`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

import httpx

from relay.errors import DeliveryFailure, PermanentFailure, TemporaryFailure
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.upstream.base import Outcome, Outgoing, Upstream
from relay.upstream.http_client import Client, Request, retry_after, said
from relay.upstream.message import Body
from relay.upstream.pacing import Pacing
from relay.upstream.recipients import address_for_api
from relay.upstream.shared import SharedLimits

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth

log = logging.getLogger("relay.upstream")

DEFERRED = frozenset({429, 503, 504})
"""Answers that ask the client to come back later (with Retry-After, when given)."""


class Api(Protocol):
    """What one API (Graph, Gmail) says: its requests, its limit, its answers."""

    title: str
    """"Microsoft Graph", "the Gmail API"."""
    limit: int
    """The largest request body it takes, in bytes."""

    def send(self, data: bytes, mailbox: str) -> Request:
        """The request that sends `data` (a MIME message) from `mailbox`."""
        ...

    def sent(self, response: httpx.Response, mailbox: str) -> str | None:
        """The reply for the log when the API took the message, else None."""
        ...

    def failure(self, response: httpx.Response, label: str, key: str,
                mailbox: str) -> DeliveryFailure:
        """An answer that did not take the message (not 401, not 429/5xx), explained."""
        ...

    def probe(self, mailbox: str) -> Request:
        """`check --connect`'s harmless call that shows the mailbox is reachable."""
        ...

    def probed(self, response: httpx.Response, mailbox: str) -> tuple[bool, str]:
        """What the probe's answer says: (passed, text; "FAILED: ..." when not)."""
        ...


class ApiUpstream:
    """An HTTP API server (Graph or Gmail) with its pacing. Implements `Upstream`."""

    wants_data = True

    def __init__(self, name: str, server: ServerSettings, api: Api, metrics: Metrics,
                 oauth: OAuth | None, fallback: Upstream | None = None,
                 shared: SharedLimits | None = None) -> None:
        self.name = name
        self.server = server
        self.api = api
        self.metrics = metrics
        self.client = Client(name, server, api, oauth)
        self.client.on_refused = metrics.auth_failures.labels(name, "Bearer").inc
        self.fallback = fallback
        self.pacing = Pacing(name, server)
        self.shared = shared
        """In a fleet: rate_limit, max_recipients_per_day and pool_size (requests in
        flight) shared with the other relays (relay.upstream.shared)."""
        self._slots = asyncio.Semaphore(server.pool_size)

    def not_before(self) -> float:
        if self.shared is not None:
            return max(self.pacing.not_before(), self.shared.not_before())
        return self.pacing.not_before()

    async def close(self) -> None:
        await self.client.close()
        if self.fallback is not None:
            await self.fallback.close()

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        body = await Body.of(message)
        addressed = address_for_api(body.data, [r.address for r in message.recipients])
        request = self.api.send(addressed.data, self.client.mailbox)
        if len(request.content) > self.api.limit:
            return await self._too_large(message, len(request.content))
        self.pacing.check(message)
        async with self._slots:
            self.pacing.check(message)
            tried = self.pacing.count(message)
            try:
                reply = await self._shared_send(request, message)
            except BaseException:
                self.pacing.uncount(tried)  # not taken: no limit is used up
                raise
        if addressed.removed or addressed.bcc:
            log.info("%s: %s: header recipients not in the envelope left out: %s; envelope "
                     "recipients sent as Bcc: %s", message.envelope.id, self.name,
                     ", ".join(addressed.removed) or "none", ", ".join(addressed.bcc) or "none")
        return [Outcome(r.address, reply) for r in message.recipients]

    async def _shared_send(self, request: Request, message: Outgoing) -> str:
        """`_send`, in a fleet within the shared limits: a lease for the request in
        flight and the message counted, given back when nothing was taken."""
        if self.shared is None:
            return await self._send(request)
        lease = await self.shared.connect()
        try:
            taken = await self.shared.take(message)
            try:
                return await self._send(request)
            except BaseException:
                self.shared.give_back(taken)
                raise
        finally:
            self.shared.disconnect(lease)

    async def _send(self, request: Request) -> str:
        response = await self.client.request(request, "send")
        status = response.status_code
        sent = self.api.sent(response, self.client.mailbox)
        if sent is not None:
            self.pacing.answered(200, sent)
            return sent
        if status in DEFERRED or status >= 500:
            failure = deferred(response, self.client.label)
            self.pacing.wait_asked(retry_after(response) if status in DEFERRED else 0.0,
                                   f"{self.client.label} answered HTTP {status}")
            raise failure
        refused = self.api.failure(response, self.client.label, self.client.key,
                                   self.client.mailbox)
        if isinstance(refused, TemporaryFailure):  # a limit the API names otherwise (Gmail)
            self.pacing.wait_asked(retry_after(response), refused.reply)
        raise refused

    async def _too_large(self, message: Outgoing, size: int) -> list[Outcome]:
        limit = self.api.limit
        if self.fallback is not None:
            log.info("%s: %d bytes to send, over %s's limit of %d: sent through "
                     "servers.%s (fallback_server)", message.envelope.id, size, self.api.title,
                     limit, self.fallback.name)
            return await self.fallback.deliver(message)
        raise PermanentFailure(
            f"the message is too large for {self.api.title}: {size} bytes to send, its limit "
            f"is {limit} ({limit // (1 << 20)} MiB); nothing was sent. Set "
            f"{self.client.key}.fallback_server to an SMTP server for such messages",
            stage="size")


def deferred(response: httpx.Response, label: str) -> TemporaryFailure:
    """429 / 503 / 504 / 5xx: the message waits for a later attempt."""
    status = response.status_code
    why = said(response)
    after = retry_after(response)
    return TemporaryFailure(
        f"{label} answered HTTP {status}{f' ({why})' if why else ''}"
        f"{f'; Retry-After {after:g} s' if after is not None else ''}; the message stays "
        "queued and is tried again later", code=status, stage="send")
