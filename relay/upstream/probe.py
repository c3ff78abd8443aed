"""`check --connect`: open an upstream session step by step and print each step.

For an HTTP API server (`probe_api`): the OAuth token, then a look-up of the mailbox
(Graph: `GET /v1.0/users/{mailbox}?$select=id,mail`; Gmail: its profile); nothing is
sent.

The probe runs what a delivery runs before its first message (POP before SMTP
when configured, connect, TLS, EHLO, STARTTLS, AUTH or the OAuth token), prints
one line per step with its time and the server's answer, and QUITs. A failing
step prints FAILED, the reply or local error and the fix; nothing ends in a
traceback. It sends no mail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import httpx

from relay.errors import DeliveryFailure
from relay.oauth.providers import ProviderClient
from relay.oauth.state import clock
from relay.settings import ServerSettings
from relay.upstream.base import explain
from relay.upstream.http_client import Client, Request
from relay.upstream.pop_before_smtp import pop_before_smtp
from relay.upstream.smtp import Session

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth


class Probing(Protocol):
    def probe(self, mailbox: str) -> Request: ...
    def probed(self, response: httpx.Response, mailbox: str) -> tuple[bool, str]: ...


async def probe(name: str, server: ServerSettings, hostname: str,
                emit: Callable[[str], None], oauth: OAuth | None = None) -> bool:
    """Open a session to `servers.NAME` step by step, `emit` one line per step, QUIT.

    True when every step passed."""
    failed = False

    def step(stage: str, seconds: float, answer: str) -> None:
        nonlocal failed
        failed = failed or answer.startswith("FAILED")
        emit(f"{stage:<16} {seconds * 1000:7.1f} ms  {explain(answer)}")

    session: Session | None = None
    try:
        session = Session(name, server, hostname, on_step=step, oauth=oauth)
        if server.pop_before_smtp is not None:
            await pop_before_smtp(name, server, on_step=step)
            if server.pop_before_smtp.wait:
                await asyncio.sleep(server.pop_before_smtp.wait)
        await session.open()
    except DeliveryFailure as e:
        if not failed:  # a failure found before any step ran (the TLS setup)
            step(e.stage or "connect", 0.0, f"FAILED: {e.reply}")
        if session is not None:
            await session.quit()
        return False
    except Exception as e:  # a bug: still one line with what happened, not a traceback
        step(session.stage if session else "setup", 0.0,
             f"FAILED: internal error in the relay: {e!r}; please report it")
        if session is not None:
            await session.quit()
        return False
    started = time.monotonic()
    await session.quit()
    step("QUIT", time.monotonic() - started, "closed")
    return True


async def probe_api(client: Client, api: Probing, oauth: OAuth,
                    emit: Callable[[str], None]) -> bool:
    """`check --connect` for an HTTP API server: the token (from which endpoint, for
    which scopes, until when), then the API's harmless look-up of the mailbox; it stops
    before sending. True when both passed."""

    def step(stage: str, seconds: float, answer: str) -> None:
        emit(f"{stage:<16} {seconds * 1000:7.1f} ms  {answer}")

    assert client.server.oauth is not None
    name = client.server.oauth.client
    started = time.monotonic()
    try:
        await client.token()
        auth = await asyncio.to_thread(oauth.authorization, name)
        endpoint = ProviderClient(name, oauth.settings.oauth_clients[name]).endpoints.token_url
        until = f"valid until {clock(auth.expires_at)}" if auth.expires_at else "no expiry given"
        step("OAuth token", time.monotonic() - started,
             f"ok for {client.mailbox} from {endpoint} (client {name}; scopes "
             f"{' '.join(auth.scopes) or '-'}; {until}; token not shown)")
        request = api.probe(client.mailbox)
        started = time.monotonic()
        response = await client.request(request, "mailbox look-up")
        passed, text = api.probed(response, client.mailbox)
        step(f"{request.method} {request.path}", time.monotonic() - started, text)
    except DeliveryFailure as e:
        step(e.stage or "request", time.monotonic() - started, f"FAILED: {e.reply}")
        return False
    except Exception as e:  # a bug: still one line with what happened, not a traceback
        step("request", time.monotonic() - started,
             f"FAILED: internal error in the relay: {e!r}; please report it")
        return False
    finally:
        await client.close()
    step("send", 0.0, "not tried: `check --connect` sends nothing (`send-test` does)")
    return passed
