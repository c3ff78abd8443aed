"""One token for the fleet: the OAuth tokens of a client live in Redis, encrypted.

`SharedTokens` is the OAuth manager's token store (relay.oauth.store.TokenStore, the
same blocking calls, run in a thread) with Redis in front of the local files: a token
is encrypted with AES-GCM under `[fleet] token_key_file` (the Redis key as associated
data), so a dump of Redis holds no usable token. Whatever a relay stores (a sign-in on
its page or by its CLI, a refresh with the rotated refresh token, the "Not granted"
left by an `invalid_grant`) goes to Redis and to its own file; what it loads is the
newer of the two (the local file when a CLI sign-in wrote it, then written to Redis),
so one sign-in grants every relay and one refusal holds every relay's mail. While
Redis does not answer, each relay uses its own file, and what it stored meanwhile
goes to Redis when it answers again.

`refresh_lock` lets one relay at a time refresh (SET NX with a lease, so a relay that
dies while refreshing blocks the others for the lease at most); the others wait, then
find the new token in Redis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path

import redis as redis_sync
import redis.asyncio as redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.errors import TokenStoreError
from relay.fleet.connect import UNREACHABLE, describe
from relay.oauth.store import StoredToken, TokenStore, _token

log = logging.getLogger("relay.fleet")

LOCK_LEASE = 30.0
"""Seconds a refresh may hold the lock before another relay may take it."""
LOCK_POLL = 0.2
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def stamp(token: StoredToken) -> tuple[float, bool]:
    """Which of two records is newer: the latest time in it; on a tie a refusal."""
    return max(token.granted_at, token.refreshed_at, token.obtained_at), bool(token.refused)


class SharedTokens(TokenStore):
    def __init__(self, directory: Path, client: redis_sync.Redis, prefix: str,
                 key: bytes, reachable: Callable[[], bool] = lambda: True) -> None:
        super().__init__(directory)
        self.redis = client
        self.reachable = reachable
        """False while the fleet's heartbeat finds Redis away: no waiting for it here."""
        self.prefix = prefix
        self._aead = AESGCM(key)
        self._unreachable = False

    def key(self, client: str, account: str) -> str:
        return f"{self.prefix}oauth:{client}:{account}"

    def load(self, client: str, account: str, *, check_mode: bool = True) -> StoredToken | None:
        local = super().load(client, account, check_mode=check_mode)
        if not self.reachable():
            return local
        try:
            raw = self.redis.get(self.key(client, account))
        except UNREACHABLE as e:
            self._lost(e)
            return local
        self._unreachable = False
        shared = self._open(client, account, raw) if isinstance(raw, str) else None
        if local is not None and (shared is None or stamp(local) > stamp(shared)):
            self._share(local)  # signed in here (the CLI), or Redis lost it
            return local
        if shared is not None and shared != local:
            super().save(shared)  # what `status` and the page read
        return shared

    def save(self, token: StoredToken) -> Path:
        path = super().save(token)
        self._share(token)
        return path

    def delete(self, client: str, account: str) -> bool:
        with contextlib.suppress(*UNREACHABLE):
            self.redis.delete(self.key(client, account))
        return super().delete(client, account)

    def _share(self, token: StoredToken) -> None:
        if not self.reachable():
            return  # shared at the next load once Redis answers: this copy is newer
        key = self.key(token.client, token.account)
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, json.dumps(asdict(token)).encode(), key.encode())
        try:
            self.redis.set(key, base64.b64encode(nonce + sealed).decode())
        except UNREACHABLE as e:
            self._lost(e)

    def _open(self, client: str, account: str, raw: str) -> StoredToken | None:
        key = self.key(client, account)
        try:
            blob = base64.b64decode(raw)
            plain = self._aead.decrypt(blob[:12], blob[12:], key.encode())
            return _token(json.loads(plain))
        except (InvalidTag, ValueError, TypeError, KeyError):
            raise TokenStoreError(
                f"the fleet's token for {client} ({account}) in Redis cannot be decrypted: "
                "every relay of the fleet needs the same [fleet] token_key_file; fix it, or "
                f"sign in again (`sysmail-relay oauth authorize {client}`)") from None

    def _lost(self, error: BaseException) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning("fleet: the shared OAuth tokens are unreachable (%s): using this "
                        "relay's own copy", describe(error))


@contextlib.asynccontextmanager
async def refresh_lock(client: redis.Redis, key: str, node: str) -> AsyncIterator[None]:
    """Hold the fleet's refresh lock of one token (or go on without it when Redis does not
    answer). Waits while another relay refreshes."""
    release = client.register_script(RELEASE)
    held = False
    deadline = time.monotonic() + LOCK_LEASE + 5
    try:
        while time.monotonic() < deadline:
            try:
                held = bool(await client.set(key, node, nx=True, px=int(LOCK_LEASE * 1000)))
            except UNREACHABLE:
                break  # each relay on its own while Redis is away
            if held:
                break
            await asyncio.sleep(LOCK_POLL)  # another relay refreshes: its token comes next
        yield
    finally:
        if held:
            with contextlib.suppress(*UNREACHABLE):
                await release(keys=[key], args=[node])
