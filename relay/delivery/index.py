"""The scheduler's index of the queue: which waiting entry is due when, in memory.

Built from the spool's envelopes at start-up (`load`: a slice at a time in a thread,
while the listener already accepts; only each entry's due time and age are kept,
never its message), kept current as messages arrive (`add`) and attempts end, and
re-read on demand (`rescan`: after `queue retry|delete`, SIGUSR1, or a lost intake
worker). A heap orders the entries by due time; a rescheduled entry leaves a stale
heap item behind, skipped when it comes up. A damaged entry found while loading is
quarantined. It also gives the counts (queued, deferred, held, dead) and the oldest
age that `/status`, the page and relay_queue_messages show.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Container

from relay.errors import DamagedEntry
from relay.spool import Envelope, Spool

log = logging.getLogger("relay.delivery")

LOAD_SLICE = 2000
"""Envelopes read per trip to the loading thread at start-up."""


class QueueIndex:
    def __init__(self, spool: Spool, on_change: Callable[[], None]) -> None:
        self.spool = spool
        self._on_change = on_change
        self._due: dict[str, float] = {}
        self._age: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self.dead = 0
        self.loaded = asyncio.Event()

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._due

    def __len__(self) -> int:
        return len(self._due)

    async def load(self, stopping: Callable[[], bool]) -> None:
        """Index every waiting entry from its envelope (not its message), a slice at a
        time in a thread; `loaded` is set when done (or failed: it is logged)."""
        started = time.monotonic()
        try:
            ids = await asyncio.to_thread(self.spool.ids, "queue")
            for first in range(0, len(ids), LOAD_SLICE):
                if stopping():
                    return
                found = await asyncio.to_thread(self.read, ids[first:first + LOAD_SLICE])
                for queue_id, entry in found:
                    if isinstance(entry, DamagedEntry):
                        await asyncio.to_thread(self.spool.quarantine, queue_id, "queue",
                                                str(entry))
                        log.error("%s: moved to quarantine: %s", queue_id, entry)
                    elif queue_id not in self._due:
                        self.add(queue_id, *entry)
            self.dead = await asyncio.to_thread(self.spool.count, "dead")
        except OSError as e:
            log.error("cannot read the queue's index: %s; the messages already queued are "
                      "sent after the next start that can read %s", e, self.spool.root / "queue")
        finally:
            self.loaded.set()
        log.info("queue index loaded in %.1f s: %d waiting, %d dead", time.monotonic() - started,
                 len(self._due), self.dead)

    def read(self, ids: list[str]) -> list[tuple[str, tuple[float, float] | DamagedEntry]]:
        """In a thread: (due, age) of each entry, or why it cannot be read."""
        found: list[tuple[str, tuple[float, float] | DamagedEntry]] = []
        for queue_id in ids:
            try:
                env = self.spool.read(queue_id, "queue")
            except DamagedEntry as e:
                found.append((queue_id, e))
                continue
            except FileNotFoundError:
                continue  # taken by the command line meanwhile
            found.append((queue_id, (env.next_attempt, env.age_base)))
        return found

    async def rescan(self, running: Container[str]) -> list[str]:
        """Re-read queue/ (the command line retried or deleted entries); return the ids
        forgotten because they are gone (not those `running`, nor those queued meanwhile)."""
        await self.loaded.wait()
        known = set(self._due)  # what arrives during the scan is not in it, and stays
        entries = await asyncio.to_thread(lambda: list(self.spool.scan("queue")))
        present = {queue_id for queue_id, _ in entries}
        gone = [q for q in known if q not in present and q not in running]
        for queue_id in gone:
            self.forget(queue_id)
        for _, env in entries:
            if isinstance(env, Envelope) and self._due.get(env.id) != env.next_attempt:
                self.add(env.id, env.next_attempt, env.age_base)
        self.dead = await asyncio.to_thread(self.spool.count, "dead")
        log.info("queue re-read: %d waiting, %d dead", len(self._due), self.dead)
        return gone

    def add(self, queue_id: str, due: float, age_base: float) -> None:
        self._due[queue_id] = due
        self._age[queue_id] = age_base
        heapq.heappush(self._heap, (due, queue_id))
        self._on_change()

    def defer(self, queue_id: str, due: float) -> None:
        """A new due time for an entry being delivered: on the heap when it ends (`requeue`)."""
        self._due[queue_id] = due
        self._age.setdefault(queue_id, time.time())

    def requeue(self, queue_id: str) -> None:
        """An attempt ended: back on the heap if the entry still waits (it was deferred)."""
        if queue_id in self._due:
            heapq.heappush(self._heap, (self._due[queue_id], queue_id))

    def forget(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        self._age.pop(queue_id, None)

    def pop_due(self, now: float, running: Container[str]) -> tuple[str | None, float | None]:
        """The next entry due by `now`, taken off the heap; else (None, seconds until the
        next one is due, or None when none waits)."""
        while self._heap:
            due, queue_id = self._heap[0]
            if self._due.get(queue_id) != due or queue_id in running:
                heapq.heappop(self._heap)  # stale: rescheduled, delivered or running
                continue
            if due > now:
                return None, due - now
            heapq.heappop(self._heap)
            return queue_id, None
        return None, None

    def waiting(self, running: Container[str]) -> list[float]:
        """The due times of the entries that wait (not `running`)."""
        return [t for q, t in self._due.items() if q not in running]

    def counts(self, running: Container[str], held: bool, now: float) -> dict[str, int]:
        waiting = self.waiting(running)
        if held:
            return {"queued": 0, "deferred": 0, "held": len(waiting), "dead": self.dead}
        deferred = sum(1 for t in waiting if t > now)
        return {"queued": len(waiting) - deferred, "deferred": deferred, "held": 0,
                "dead": self.dead}

    def oldest_age(self, now: float) -> float:
        return now - min(self._age.values()) if self._age else 0.0
