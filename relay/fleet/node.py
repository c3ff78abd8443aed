"""This relay as a member of a fleet: heartbeats, who is alive, whether Redis answers.

Every `[fleet] heartbeat` seconds the relay writes its record (name, version, pid,
queue counts, last seen) with a time to live of three heartbeats
(relay.fleet.scripts.HEARTBEAT) and reads everyone else's: the live relays are the
fleet, and their number is the divisor of the local share when Redis goes away. That
number is also kept in state_dir (`fleet-size`), so a relay started while Redis is
down still keeps to a share. The heartbeat renews this relay's connection leases,
and reads and writes the account's shared state (relay.fleet.account).

Redis unreachable: said once in the log (and again when it is back), in `status`,
and as `relay_fleet_connected` 0; acceptance never asks Redis, delivery goes on with
the local share (relay.fleet.limits), and the heartbeat keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Gauge

from relay import __version__
from relay.errors import TokenStoreError
from relay.fleet.account import SharedAccount
from relay.fleet.connect import (
    UNREACHABLE,
    client,
    describe,
    key_prefix,
    node_name,
    shown,
    sync_client,
)
from relay.fleet.limits import FleetLimits
from relay.fleet.scripts import HEARTBEAT
from relay.fleet.tokens import SharedTokens, refresh_lock
from relay.metrics import Metrics
from relay.oauth.manager import OAuth
from relay.settings import ServerSettings, Settings
from relay.settings.fleet import token_key
from relay.spool import state

log = logging.getLogger("relay.fleet")

SIZE_FILE = "fleet-size"


class Fleet:
    def __init__(self, settings: Settings, metrics: Metrics,
                 counts: Callable[[], dict[str, int]]) -> None:
        fleet = settings.fleet
        assert fleet is not None
        self.settings = settings
        self.url = shown(fleet.url)
        """Where Redis is, for people (without a password written into the url)."""
        self.interval = fleet.heartbeat
        self.lease_ttl = 3 * fleet.heartbeat + fleet.timeout
        """Seconds a connection lease outlives its relay's last heartbeat."""
        self.redis = client(fleet)
        self.prefix = key_prefix(settings)
        self.node = node_name(settings)
        self.counts = counts
        self.connected = False
        self.since = time.time()
        """When `connected` last changed."""
        self.last_error = ""
        self.members: list[dict[str, Any]] = []
        self.size = self._read_size()
        """How many relays the fleet had when Redis last answered (at least 1)."""
        self._limits: dict[str, FleetLimits] = {}
        self.tokens: SharedTokens | None = None
        """The OAuth tokens shared by the fleet (with `token_key_file`)."""
        self._oauth: OAuth | None = None
        self._granted: dict[tuple[str, str], bool] = {}
        self.refreshing: dict[str, str] = {}
        """Per OAuth client, the relay that holds its refresh lock now."""
        self.on_token_granted: Callable[[str], None] | None = None
        """Called with an OAuth client signed in on another relay (held mail is due)."""
        self.account = SharedAccount(self.redis, self.key("account"), self.node,
                                     settings.system_account.active)
        self._heartbeat = self.redis.register_script(HEARTBEAT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._run: asyncio.Task[None] | None = None
        self._connected_gauge = Gauge(
            "relay_fleet_connected", "1 while the fleet's Redis answers, 0 while the relay "
            "keeps to its local share", registry=metrics.registry)
        self._members_gauge = Gauge(
            "relay_fleet_members", "Relays in the fleet (live heartbeats) as last seen",
            registry=metrics.registry)
        self._connected_gauge.set_function(lambda: float(self.connected))
        self._members_gauge.set_function(lambda: float(self.size))

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """The first heartbeat (not waited for when Redis does not answer), then one every
        `interval` seconds."""
        await self.beat()
        if not self.connected:
            log.warning("fleet: Redis at %s does not answer (%s): delivering with a local "
                        "share of the limits (1/%d) until it does", self.url,
                        self.last_error, self.size)
        self._run = asyncio.create_task(self._beating(), name="fleet-heartbeat")

    async def stop(self) -> None:
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.fleet.timeout
                               if self.settings.fleet else 1.0)
        if self.connected:  # leave at once rather than when the heartbeat expires
            with contextlib.suppress(*UNREACHABLE):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(self.key("nodes"), self.node)
                    pipe.delete(self.key("node:") + self.node)
                    for limits in self._limits.values():
                        if limits.leases:
                            pipe.zrem(limits.key("conn"), *limits.leases)
                    await pipe.execute()
        await self.redis.aclose()
        if self.tokens is not None:
            self.tokens.redis.close()

    def limits(self, name: str, server: ServerSettings) -> FleetLimits:
        """The shared limits of server `name` (one object per name; a reload updates it)."""
        found = self._limits.get(name)
        if found is None:
            found = self._limits[name] = FleetLimits(self, name, server)
        found.server = server
        return found

    def key(self, what: str) -> str:
        return self.prefix + what

    def share_tokens(self, oauth: OAuth) -> None:
        """With `token_key_file`: `oauth` keeps its tokens in Redis and refreshes one relay
        at a time (relay.fleet.tokens)."""
        fleet = self.settings.fleet
        if fleet is None or fleet.token_key_file is None:
            return
        tokens = SharedTokens(oauth.store.directory, sync_client(fleet), self.prefix,
                              token_key(fleet.token_key_file), lambda: self.connected)
        oauth.store = self.tokens = tokens
        oauth.refresh_guard = lambda client, account: refresh_lock(
            self.redis, tokens.key(client, account) + ":refresh", self.node)
        self._oauth = oauth

    async def _watch_tokens(self) -> None:
        """Each heartbeat: a sign-in on another relay releases the mail held here; who
        holds each refresh lock."""
        if self.tokens is None or self._oauth is None:
            return
        clients = {s.oauth.client for s in self.settings.servers.values() if s.oauth}
        for name in sorted(clients):
            account = self._oauth.account(name)
            try:
                token = await asyncio.to_thread(self.tokens.load, name, account)
            except TokenStoreError as e:
                log.warning("fleet: %s", e)
                continue
            granted = bool(token and not token.refused and (token.refresh_token
                                                              or token.access_token))
            was = self._granted.get((name, account))
            self._granted[(name, account)] = granted
            if was is False and granted and self.on_token_granted is not None:
                log.info("fleet: %s was signed in on another relay", name)
                self.on_token_granted(name)
            holder = await self.redis.get(self.tokens.key(name, account) + ":refresh")
            if holder:
                self.refreshing[name] = str(holder)
            else:
                self.refreshing.pop(name, None)

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- heartbeats ---------------------------------------------------------------------

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> None:
        record = json.dumps({"node": self.node, "version": __version__, "pid": os.getpid(),
                             "queue": self.counts(), "last_seen": time.time()})
        try:
            found = await self._heartbeat(keys=[self.key("nodes"), self.key("node:")],
                                          args=[self.node, 3 * self.interval, record])
            for limits in self._limits.values():
                await limits.renew()
            await self.account.sync()
        except UNREACHABLE as e:
            self.lost(e)
            return
        self.members = sorted((json.loads(r) for r in found), key=lambda m: str(m["node"]))
        if not self.connected:
            self.connected, self.since, self.last_error = True, time.time(), ""
            log.info("fleet: connected to Redis at %s as %s; %d relays in the fleet",
                     self.url, self.node, len(self.members))
        size = max(1, len(self.members))
        if size != self.size:
            self.size = size
            await asyncio.to_thread(self._write_size, size)
        try:
            await self._watch_tokens()  # once connected: the token store asks Redis too
        except UNREACHABLE as e:
            self.lost(e)

    def lost(self, error: BaseException) -> None:
        """Redis did not answer: from now on the local share, until a heartbeat succeeds."""
        self.last_error = describe(error)
        if self.connected:
            self.connected, self.since = False, time.time()
            log.warning("fleet: Redis at %s does not answer (%s): delivering with a local "
                        "share of the limits (1/%d of each) until it does; mail is still "
                        "accepted", self.url, self.last_error, self.size)

    def status(self) -> dict[str, Any]:
        """For /status, `sysmail-relay status` and the page."""
        return {"node": self.node, "url": self.url, "connected": self.connected,
                "since": self.since, "last_error": self.last_error or None,
                "size": self.size, "members": self.members if self.connected else [],
                "account": self.account.state, "refresh_lock": self.refreshing}

    # --- the fleet's size, kept for a start without Redis -------------------------------

    def _read_size(self) -> int:
        try:
            return max(1, int((self.settings.state_dir / SIZE_FILE).read_text().strip()))
        except (OSError, ValueError):
            return 1

    def _write_size(self, size: int) -> None:
        with contextlib.suppress(OSError):
            state.write_atomically(self.settings.state_dir / SIZE_FILE,
                                   f"{size}\n".encode(), sync=False)
