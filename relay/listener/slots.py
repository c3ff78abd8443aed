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
import struct

SLOTS = 128
"""Places in the shared file: more than the workers that can run at once (64)."""
_ENTRY = struct.Struct("=q")


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
        self._map = mmap.mmap(fd, SLOTS * _ENTRY.size)

    @classmethod
    def create(cls) -> SharedSlots:
        """The parent's: a new, zeroed file (its fd is inheritable by the workers)."""
        fd = os.memfd_create("sysmail-relay-connections", 0)
        os.ftruncate(fd, SLOTS * _ENTRY.size)
        return cls(fd)

    def _total(self) -> int:
        return sum(n for (n,) in _ENTRY.iter_unpack(self._map))

    def _add(self, place: int, delta: int | None) -> int:
        """Under the lock: add `delta` to `place` (None: set it to 0); the total before."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            total = self._total()
            offset = place * _ENTRY.size
            (own,) = _ENTRY.unpack_from(self._map, offset)
            _ENTRY.pack_into(self._map, offset, 0 if delta is None else own + delta)
            return total
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def take(self, limit: int) -> bool:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if self._total() >= limit:
                return False
            offset = self.place * _ENTRY.size
            (own,) = _ENTRY.unpack_from(self._map, offset)
            _ENTRY.pack_into(self._map, offset, own + 1)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def give(self) -> None:
        self._add(self.place, -1)

    def clear(self, place: int) -> None:
        """The parent's, for a worker that ended: its sessions are gone with it."""
        self._add(place, None)

    @property
    def total(self) -> int:
        return self._total()

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
