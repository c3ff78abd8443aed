"""The Redis (or Valkey) connection of a fleet, its key names and this relay's name.

Every key starts with `[fleet] key_prefix` (default "sysmail-relay:<system address>:"),
so that several accounts or environments share one Redis. A command that gets no answer
within `[fleet] timeout` fails at once (no retries here): the caller falls back to its
local share (relay.fleet.limits) and the heartbeat (relay.fleet.node) finds out when
Redis is back.
"""

from __future__ import annotations

import hashlib
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import redis as redis_sync
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry as SyncRetry

from relay.settings import FleetSettings, Settings

UNREACHABLE = (RedisError, OSError, TimeoutError)
"""What a Redis command raises when Redis cannot be reached or answer."""


def client(fleet: FleetSettings) -> redis.Redis:
    """A client for `fleet.url`; nothing is connected before the first command."""
    return redis.Redis.from_url(fleet.url, **_options(fleet, Retry(NoBackoff(), 0)))


def sync_client(fleet: FleetSettings) -> redis_sync.Redis:
    """The same, blocking, for the token store (whose callers run it in a thread)."""
    return redis_sync.Redis.from_url(fleet.url, **_options(fleet, SyncRetry(NoBackoff(), 0)))


def _options(fleet: FleetSettings, retry: object) -> dict[str, Any]:
    """What both clients are given: the timeouts, no retries (a relay without Redis goes
    on at once), the password and the CA."""
    options: dict[str, Any] = {
        "socket_timeout": fleet.timeout,
        "socket_connect_timeout": fleet.timeout,
        "retry": retry,
        "decode_responses": True,
    }
    if fleet.password is not None:
        options["password"] = fleet.password.get_secret_value()
    if fleet.ca_file is not None:
        options["ssl_ca_certs"] = str(fleet.ca_file)
    return options


def key_prefix(settings: Settings) -> str:
    fleet = settings.fleet
    assert fleet is not None
    if fleet.key_prefix:
        return fleet.key_prefix
    return f"sysmail-relay:{settings.system_account.address}:"


def node_name(settings: Settings) -> str:
    """`[fleet] node_name`, else the host name and a hash of state_dir (two relays on one
    host are two nodes)."""
    fleet = settings.fleet
    assert fleet is not None
    if fleet.node_name:
        return fleet.node_name
    digest = hashlib.sha256(str(Path(settings.state_dir).resolve()).encode()).hexdigest()
    return f"{socket.gethostname()}-{digest[:6]}"


def shown(url: str) -> str:
    """`url` for logs, `status` and the page: a password written into it is left out."""
    parts = urllib.parse.urlsplit(url)
    query = "&".join("password=***" if item.startswith("password=") else item
                     for item in parts.query.split("&")) if parts.query else ""
    netloc = parts.netloc
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else ":***@"
        netloc = user + parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def describe(error: BaseException) -> str:
    """A Redis failure for the log: the cause, never a password."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
