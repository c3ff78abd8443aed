"""One account state for the fleet: Activate / Deactivate done on one relay holds or
releases mail on every relay.

Redis keeps `account` = {"active": bool, "by": node, "at": time}. A relay publishes
when its own configuration's `system_account.active` changes (a reload after the file
changed) or when Activate / Deactivate is chosen on its page (`chosen`); at start,
and whenever Redis has lost it, the first relay to find no state writes its own.
Every heartbeat reads it, and a relay whose account is not as the fleet says applies
it (the daemon's `on_account`). While Redis is unreachable each relay keeps the state
it had.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis

from relay.settings import Settings

log = logging.getLogger("relay.fleet")


def with_active(settings: Settings, active: bool) -> Settings:
    """`settings` with the account active or not (the rest as it is)."""
    if settings.system_account.active == active:
        return settings
    account = settings.system_account.model_copy(update={"active": active})
    return settings.model_copy(update={"system_account": account})


class SharedAccount:
    def __init__(self, client: redis.Redis, key: str, node: str, file_active: bool) -> None:
        self.redis = client
        self.key = key
        self.node = node
        self.file_active = file_active
        """`active` as this relay's own configuration says."""
        self.state: dict[str, Any] | None = None
        """The fleet's state as last read (None: not known yet)."""
        self._publish: bool | None = None
        """A change of this relay's configuration not written to Redis yet."""
        self.on_account: Callable[[bool, str], None] | None = None
        """Called with (active, by whom) when the fleet's state differs from this relay's."""

    @property
    def active(self) -> bool | None:
        return None if self.state is None else bool(self.state["active"])

    def reloaded(self, new: Settings) -> Settings:
        """At a reload: a changed `active` is this relay's Activate / Deactivate, for the
        whole fleet (written at the next heartbeat); else the fleet's state stays."""
        active = new.system_account.active
        if active != self.file_active:
            self.file_active = active
            self._publish = active
            self.state = {"active": active, "by": self.node, "at": time.time()}
            return new
        return with_active(new, self.active) if self.active is not None else new

    def chosen(self, active: bool) -> None:
        """Activate / Deactivate chosen on this relay's page: for the whole fleet."""
        self._publish = active
        self.state = {"active": active, "by": self.node, "at": time.time()}

    async def sync(self) -> None:
        """With each heartbeat (raises what Redis raises when it does not answer)."""
        if self._publish is not None:
            record = {"active": self._publish, "by": self.node, "at": time.time()}
            await self.redis.set(self.key, json.dumps(record))
            self._publish = None
        raw = await self.redis.get(self.key)
        if raw is None:  # new, or Redis lost it: ours (as it is now) becomes the fleet's
            mine = self.active if self.active is not None else self.file_active
            record = {"active": mine, "by": self.node, "at": time.time()}
            await self.redis.set(self.key, json.dumps(record), nx=True)
            raw = await self.redis.get(self.key)
            if raw is None:
                return
        state: dict[str, Any] = json.loads(raw)
        changed = self.state is None or bool(state["active"]) != self.active
        self.state = state
        if changed and self.on_account is not None:
            self.on_account(bool(state["active"]), str(state.get("by", "?")))
