"""Which upstream sends: the built-in outbox, SMTP, Microsoft Graph or the Gmail API.

`make_upstream` builds the `Upstream` of the sending server (system_account.server)
from its `protocol`; an HTTP API server with `fallback_server` gets that server's
upstream for the messages over the API's size limit (the fallback's own
fallback_server is not followed). `check_connect` is `check --connect`: the step-by-step
probe of the same server (relay.upstream.probe), or a write test of the outbox.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

from relay.metrics import Metrics
from relay.oauth.manager import OAuth
from relay.settings import LOCAL_SERVER, Settings
from relay.spool import state
from relay.upstream.base import Upstream
from relay.upstream.gmail import Gmail
from relay.upstream.graph import Graph
from relay.upstream.http_api import ApiUpstream
from relay.upstream.http_client import Client
from relay.upstream.outbox import LocalOutbox
from relay.upstream.probe import probe, probe_api
from relay.upstream.shared import LimitsSource
from relay.upstream.smtp_pool import SmtpUpstream

APIS: dict[str, type[Graph] | type[Gmail]] = {"graph": Graph, "gmail_api": Gmail}


def make_upstream(settings: Settings, metrics: Metrics | None = None,
                  oauth: OAuth | None = None, name: str | None = None,
                  fallback: bool = True, fleet: LimitsSource | None = None) -> Upstream:
    """The upstream of servers.NAME (default: the sending server); in a fleet, with the
    limits its relays share."""
    name = name or settings.system_account.server
    server = settings.servers.get(name)
    if server is None:
        return LocalOutbox(settings.outbox)
    metrics = metrics or Metrics()
    if oauth is None and server.oauth is not None:
        oauth = OAuth(settings, metrics)
    shared = fleet.limits(name, server) if fleet is not None else None
    if server.http:
        spare = None
        if fallback and server.fallback_server is not None:
            spare = make_upstream(settings, metrics, oauth, server.fallback_server,
                                  fallback=False, fleet=fleet)
        return ApiUpstream(name, server, APIS[server.protocol](), metrics, oauth, spare,
                           shared=shared)
    return SmtpUpstream(name, server, metrics, local_hostname(settings), oauth=oauth,
                        shared=shared)


def local_hostname(settings: Settings) -> str:
    return settings.listener.hostname or socket.gethostname()


def check_connect(settings: Settings, emit: Callable[[str], None]) -> bool:
    """`check --connect`: try the delivery path step by step, one line per step."""
    name = settings.system_account.server
    if name == LOCAL_SERVER:
        return _check_outbox(settings, emit)
    server = settings.active_server
    assert server is not None
    oauth = OAuth(settings, Metrics())
    if server.http:
        api = APIS[server.protocol]()
        return asyncio.run(probe_api(Client(name, server, api, oauth), api, oauth, emit))
    return asyncio.run(probe(name, server, local_hostname(settings), emit, oauth=oauth))


def _check_outbox(settings: Settings, emit: Callable[[str], None]) -> bool:
    started = time.monotonic()
    try:
        outbox = LocalOutbox(settings.outbox)
        outbox.ensure()
        scratch = settings.outbox / "tmp" / f".check-{os.getpid()}"
        os.close(state.open_private(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        scratch.unlink()
    except OSError as e:
        emit(f"outbox   FAILED  {settings.outbox}: {e.strerror}")
        return False
    emit(f"outbox   ok      {settings.outbox} is writable "
         f"({(time.monotonic() - started) * 1000:.1f} ms)")
    return True
