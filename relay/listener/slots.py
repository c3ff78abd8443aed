"""Connection slots: `listener.max_connections` for the whole daemon.

`LocalSlots` counts the sessions of one process (`listener.workers = 1`).
`SharedSlots` counts them across the intake processes: a small shared memory file
(a memfd the parent creates and every worker inherits) holds one counter per
worker, and a POSIX record lock (`lockf`, which the kernel drops when its holder
dies) makes "sum all, compare, add one" atomic. One counter per worker rather than
one for all: when a worker dies, the parent sets its counter back to 0 before a
replacement takes that place, so the sessions of a killed worker never hold slots.
"""

from __future__ import annotations

import fcntl
import mmap
import os

SLOTS = 128
"""Places in the shared file: more than the workers that can run at once (64)."""
_SIZE = SLOTS * 8


class LocalSlots:
    def __init__(self) -> None:
        self.count = 0

    def take(self, limit: int) -> bool:
        """One more session, if fewer than `limit` are open; False at the limit."""
        if self.count >= limit:
            return False
        self.count += 1
        return True

    def give(self) -> None:
        self.count -= 1


class SharedSlots:
    """The daemon's sessions, counted by place (one per live worker)."""

    def __init__(self, fd: int, place: int = 0) -> None:
        self.fd = fd
        self.place = place
        self._map = mmap.mmap(fd, _SIZE)

    @classmethod
    def create(cls) -> SharedSlots:
        """The parent's: a new, zeroed file (its fd is inheritable by the workers)."""
        fd = os.memfd_create("sysmail-relay-connections", 0)
        os.ftruncate(fd, _SIZE)
        return cls(fd)

    def _update(self, place: int, delta: int, limit: int | None = None) -> bool:
        """Add `delta` to `place`'s counter (0: set it to 0), unless the total is at
        `limit`; under the lock, so no other process counts meanwhile."""
        counters = memoryview(self._map).cast("q")
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if limit is not None and sum(counters) >= limit:
                return False
            counters[place] = counters[place] + delta if delta else 0
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            counters.release()

    def take(self, limit: int) -> bool:
        return self._update(self.place, 1, limit)

    def give(self) -> None:
        self._update(self.place, -1)

    def clear(self, place: int) -> None:
        """The parent's, for a worker that ended: its sessions are gone with it."""
        self._update(place, 0)

    @property
    def total(self) -> int:
        with memoryview(self._map).cast("q") as counters:
            return sum(counters)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
