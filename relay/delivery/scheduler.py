"""The delivery scheduler: drains the spool through the upstream.

An in-memory index (queue id -> when it is due) is built from the spool's
envelopes at start-up, while the listener already accepts, and kept current as
messages arrive and attempts end. At most `pool_size` deliveries send at once
(see below). 4xx, timeouts, connection and
authentication failures defer the message with exponential backoff
(`queue.retry_initial` doubling up to `queue.retry_max`); a 5xx fails that
recipient; a message older than `queue.max_age` becomes a dead letter with the
last reply as its reason (the pure policy: relay.delivery.retry). While the system
account is inactive nothing is sent.
Each attempt's result feeds the server's health (relay.delivery.health): its state, last
error, last success; mail waiting while that state is inactive, not granted or
paused by authentication failures counts as `held`, other waiting mail as queued
or deferred. When the spool itself refuses (EIO, EACCES, ENOSPC: the entry
cannot be taken, or the result not recorded) or the relay has a bug, the entry is put
back as it was and waits with the same backoff, counted in memory; that is logged
once per entry and cause, not at every try. No exception leaves a delivery task.

Every file-system call of a delivery runs in a thread: one hop to claim the entry
and read a small message, one to remove it once delivered, both in batches (one
thread for every claim and removal, with one fsync of active/ for a batch of claims:
relay.delivery.disk); what waits for the disk (fsync on a deferral or a dead letter)
in asyncio's threads.

The spool holds what the client sent; each attempt applies the rewrite for the
account as it is then (relay.delivery.outgoing).

A delivery also reads its entry before it sends and removes it after: so that
the connections never wait for the disk, up to twice as many deliveries as
there are connections run at once (the upstream lets `pool_size` of them send, and
as many more read or remove their entries, or wait for a connection). No more: every entry in
`active` at a crash counts as interrupted (queue.max_crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from relay.delivery.disk import DiskWork, Result
from relay.delivery.health import HELD_STATES, ServerHealth
from relay.delivery.outgoing import outgoing
from relay.delivery.retry import backoff, settle
from relay.errors import DamagedEntry, DeliveryFailure, Held, TemporaryFailure
from relay.metrics import Metrics
from relay.settings import Settings
from relay.spool.store import INLINE_BYTES, Claimed, Envelope, Spool
from relay.upstream.base import Outcome, Upstream

log = logging.getLogger("relay.delivery")
T = TypeVar("T")

UpstreamFactory = Callable[[Settings], Upstream]
_LOCAL_POOL = 4
_HEAD_CHUNK = 1 << 16
"""The first read of a large message's header block (then twice as much each time)."""
_LOAD_SLICE = 2000
"""Envelopes read per trip to the loading thread at start-up."""
_READ_AHEAD = 2
"""Deliveries in flight per upstream connection: one sending, and one reading or removing
its entry or waiting for the connection (relay.upstream.smtp_pool)."""
RECENT = 50
"""How many of the latest per-recipient results the admin page can show."""


class Scheduler:
    def __init__(self, spool: Spool, settings: Settings, metrics: Metrics,
                 make_upstream: UpstreamFactory) -> None:
        self.spool = spool
        self.settings = settings
        self.metrics = metrics
        self._make_upstream = make_upstream
        self.upstream = make_upstream(settings)
        self._due: dict[str, float] = {}
        self._age: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._disk = DiskWork()
        self._troubles: dict[str, tuple[str, int]] = {}
        """Entries the relay itself could not handle: the cause, and tries in a row."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loaded = asyncio.Event()
        self._stopping = False
        self.dead = 0
        self.recent: deque[Result] = deque(maxlen=RECENT)
        self.on_dead: Callable[[Envelope], None] | None = None
        """Called with each message that has just become a dead letter (queue.notify)."""
        gauges = metrics.queue_messages
        gauges.labels("queued").set_function(lambda: self.counts()["queued"])
        gauges.labels("deferred").set_function(lambda: self.counts()["deferred"])
        gauges.labels("held").set_function(lambda: self.counts()["held"])
        gauges.labels("dead").set_function(lambda: self.dead)
        metrics.queue_oldest_seconds.set_function(self.oldest_age)
        self.health: dict[str, ServerHealth] = {}
        """Per server (by name): what the attempts through it said (relay.delivery.health)."""
        self.server_health()

    # --- the index ------------------------------------------------------------------

    async def load(self) -> None:
        """Index every waiting entry from its envelope (not its message), a slice at a
        time in a thread: the listener accepts meanwhile, and only the index stays in
        memory. `run` starts sending once this is done."""
        started = time.monotonic()
        try:
            ids = await asyncio.to_thread(self.spool.ids, "queue")
            for first in range(0, len(ids), _LOAD_SLICE):
                if self._stopping:
                    return
                found = await asyncio.to_thread(self._read_index, ids[first:first + _LOAD_SLICE])
                for queue_id, entry in found:
                    if isinstance(entry, DamagedEntry):
                        await asyncio.to_thread(self.spool.quarantine, queue_id, "queue",
                                                str(entry))
                        log.error("%s: moved to quarantine: %s", queue_id, entry)
                    elif queue_id not in self._due:
                        self._index(queue_id, *entry)
            self.dead = await asyncio.to_thread(self.spool.count, "dead")
        except OSError as e:
            log.error("cannot read the queue's index: %s; the messages already queued are "
                      "sent after the next start that can read %s", e, self.spool.root / "queue")
        finally:
            self._loaded.set()
        counts = self.counts()
        log.info("queue index loaded in %.1f s: %d waiting, %d dead", time.monotonic() - started,
                 counts["queued"] + counts["deferred"] + counts["held"], counts["dead"])

    def _read_index(self, ids: list[str]) -> list[tuple[str, tuple[float, float] | DamagedEntry]]:
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

    async def rescan(self) -> None:
        """Re-read queue/ after the command line retried or deleted entries."""
        await self._loaded.wait()
        known = set(self._due)  # what arrives during the scan is not in it, and stays
        entries = await asyncio.to_thread(lambda: list(self.spool.scan("queue")))
        present = {queue_id for queue_id, _ in entries}
        for queue_id in [q for q in known if q not in present and q not in self._inflight]:
            self._forget(queue_id)
        for _, env in entries:
            if isinstance(env, Envelope) and self._due.get(env.id) != env.next_attempt:
                self.add(env)
        self.dead = await asyncio.to_thread(self.spool.count, "dead")
        log.info("queue re-read: %d waiting, %d dead", len(self._due), self.dead)

    def add(self, env: Envelope) -> None:
        self._index(env.id, env.next_attempt, env.age_base)

    def add_entry(self, queue_id: str, due: float, age_base: float) -> None:
        """`add` of an entry known by its id and times (an intake worker's notice)."""
        self._index(queue_id, due, age_base)

    def _index(self, queue_id: str, due: float, age_base: float) -> None:
        self._due[queue_id] = due
        self._age[queue_id] = age_base
        heapq.heappush(self._heap, (due, queue_id))
        self._wake.set()

    def _forget(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        self._age.pop(queue_id, None)
        self._troubles.pop(queue_id, None)

    @property
    def held(self) -> bool:
        return not self.settings.system_account.active

    def server_health(self, name: str | None = None) -> ServerHealth:
        """The health record of a server (default: the sending one), made on first use
        with its relay_upstream_up gauge."""
        name = name or self.settings.system_account.server
        found = self.health.get(name)
        if found is None:
            found = self.health[name] = ServerHealth(name)
            self.metrics.upstream_up.labels(name).set_function(
                lambda: float(self._up(name)))
        return found

    def _up(self, name: str) -> bool:
        paused = self.upstream.not_before() if name == self.upstream.name else 0.0
        return self.health[name].up(paused, time.time())

    def server_state(self) -> str:
        """The sending server's state (relay.delivery.health): ok, failing, paused, not granted,
        inactive."""
        return self.server_health().state(active=not self.held,
                                          paused_until=self.upstream.not_before(),
                                          now=time.time())

    def health_report(self) -> list[dict[str, object]]:
        """Every server's state, last error, next attempt, last success (for /status)."""
        now = time.time()
        sending = self.server_health()
        waiting = [t for q, t in self._due.items() if q not in self._inflight]
        return [health.report(
            active=not self.held, now=now,
            paused_until=self.upstream.not_before() if health is sending else 0.0,
            next_attempt=min(waiting) if waiting and health is sending else None)
            for health in self.health.values()]

    def counts(self) -> dict[str, int]:
        now = time.time()
        waiting = [t for q, t in self._due.items() if q not in self._inflight]
        if self.server_state() in HELD_STATES:
            return {"queued": 0, "deferred": 0, "held": len(waiting), "dead": self.dead,
                    "active": len(self._inflight)}
        deferred = sum(1 for t in waiting if t > now)
        return {"queued": len(waiting) - deferred, "deferred": deferred, "held": 0,
                "dead": self.dead, "active": len(self._inflight)}

    def oldest_age(self) -> float:
        return time.time() - min(self._age.values()) if self._age else 0.0

    # --- running --------------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        server = self.settings.active_server
        return _READ_AHEAD * (server.pool_size if server is not None else _LOCAL_POOL)

    async def run(self) -> None:
        await self._loaded.wait()
        loop = asyncio.get_running_loop()
        while not self._stopping:
            delay = self._dispatch()
            self._wake.clear()
            timer = None if delay is None else loop.call_later(delay, self._wake.set)
            await self._wake.wait()  # a new message, a finished delivery, or the timer
            if timer is not None:
                timer.cancel()

    def _dispatch(self) -> float | None:
        """Start what is due; return how long until the next entry is due."""
        if self.held:
            return None
        now = time.time()
        paused = self.upstream.not_before()
        if paused > now:  # rate limit or authentication pause: the queue waits
            return paused - now
        while self._heap and len(self._inflight) < self._capacity:
            due, queue_id = self._heap[0]
            if self._due.get(queue_id) != due or queue_id in self._inflight:
                heapq.heappop(self._heap)  # stale: rescheduled, delivered or running
                continue
            if due > now:
                return due - now
            heapq.heappop(self._heap)
            task = asyncio.create_task(self._deliver(queue_id), name=f"deliver-{queue_id}")
            self._inflight[queue_id] = task
            self._idle.clear()
            task.add_done_callback(functools.partial(self._forget_task, queue_id))
        if not self._heap or len(self._inflight) >= self._capacity:
            return None  # a finished delivery wakes the loop (no timer spinning at 0 s)
        return max(0.0, self._heap[0][0] - now)

    def _forget_task(self, queue_id: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self._defer_in_trouble(queue_id, error, "internal error in the relay")
        self._done(queue_id)

    def _done(self, queue_id: str) -> None:
        self._inflight.pop(queue_id, None)
        if queue_id in self._due:  # deferred: its new time may have been popped while running
            heapq.heappush(self._heap, (self._due[queue_id], queue_id))
        if not self._inflight:
            self._idle.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self, settings: Settings) -> None:
        old = self.upstream
        self.settings = settings
        self.upstream = self._make_upstream(settings)
        self.server_health()
        asyncio.get_running_loop().create_task(old.close())
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Start nothing new; let deliveries in flight finish for `grace` seconds, then cancel."""
        self._stopping = True
        self._wake.set()
        if self._inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                for task in list(self._inflight.values()):
                    task.cancel()
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self.upstream.close()

    # --- one delivery -----------------------------------------------------------------

    async def _deliver(self, queue_id: str) -> None:
        """One delivery. Whatever goes wrong in the relay itself (the spool refuses: EIO,
        EACCES, ENOSPC; or a bug), the entry goes back to the queue and waits like a
        deferred message; nothing escapes the task."""
        try:
            await self._deliver_entry(queue_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._trouble(queue_id, e, "internal error in the relay")

    async def _deliver_entry(self, queue_id: str) -> None:
        claiming = asyncio.ensure_future(  # the claim made durable: one sync of active/ a batch
            self._disk.run(functools.partial(self._claim, queue_id), self.spool.sync))
        try:
            claimed = await asyncio.shield(claiming)  # claim and, when small, the bytes: one hop
        except DamagedEntry as e:
            await asyncio.to_thread(self.spool.quarantine, queue_id, "active", str(e))
            log.error("%s: moved to quarantine: %s", queue_id, e)
            self._forget(queue_id)
            return
        except OSError as e:
            await self._trouble(queue_id, e, "cannot take the message from the spool")
            return
        except asyncio.CancelledError:  # stopping: the thread finishes; undo its claim
            with contextlib.suppress(Exception):
                if await claiming is not None:
                    await asyncio.to_thread(self.spool.put_back, queue_id)
            raise
        if claimed is None:  # deleted or taken by `queue retry|delete`
            self._forget(queue_id)
            return
        env = claimed.envelope
        troubled = queue_id in self._troubles
        try:
            outcomes = await self._attempt(claimed)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self.spool.put_back, env.id))
            raise
        try:
            await self._settle(env, outcomes)
        except OSError as e:  # disk full, I/O error: the upstream may have it already
            await self._trouble(env.id, e, "cannot record the delivery result in the spool "
                                           "(the message may arrive twice)")
            return
        self._troubles.pop(queue_id, None)
        if troubled:
            log.info("%s: the spool works again for this message", queue_id)

    async def _trouble(self, queue_id: str, error: Exception, what: str) -> None:
        """Put a taken entry back as it is (a rename: needs no free space) and let it wait."""
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.spool.put_back, queue_id)
        self._defer_in_trouble(queue_id, error, what)

    def _defer_in_trouble(self, queue_id: str, error: BaseException, what: str) -> None:
        """Back off an entry the relay could not handle, with the delays of a deferred
        message, counted here (the spool may not take a new attempt count). Logged when
        the entry first meets this cause, not at every try."""
        cause = f"{what}: {_describe(error)}"
        previous, tries = self._troubles.get(queue_id, ("", 0))
        self._troubles[queue_id] = (cause, tries + 1)
        delay = self.backoff(tries + 1)
        self._due[queue_id] = time.time() + delay  # `_done` puts it back on the heap
        self._age.setdefault(queue_id, time.time())
        if cause == previous:
            log.debug("%s: %s; tried again in %.0f s", queue_id, cause, delay)
            return
        fix = (f"check the file system of {self.spool.root} (free space, the relay user's "
               "permissions, I/O errors in the kernel log)" if isinstance(error, OSError)
               else "please report this with the log")
        log.error("%s: %s; the message stays in the queue and is tried again in %.0f s, then "
                  "with growing delays (logged again when the cause changes); %s", queue_id,
                  cause, delay, fix, exc_info=None if isinstance(error, OSError) else error)

    def _claim(self, queue_id: str) -> Claimed | None:
        """Take the entry and, when the message is not large and the upstream wants its
        bytes or they are to be rewritten, its bytes (the page cache's work; a large
        message is read as it is sent): one open of the entry, in this thread."""
        taken = self.spool.take(queue_id, INLINE_BYTES)
        if taken is None or self.upstream.wants_data or taken.envelope.as_received:
            return taken
        return dataclasses.replace(taken, data=None)  # sent as stored, from the file

    async def _attempt(self, claimed: Claimed) -> list[Outcome]:
        env = claimed.envelope
        server = self.settings.system_account.server
        pending = env.pending
        started = time.monotonic()
        try:
            message = await outgoing(claimed, self.settings)
            outcomes = await self.upstream.deliver(message)
        except DeliveryFailure as failure:
            outcomes = [Outcome(r.address, failure.reply, failure) for r in pending]
        except Exception as e:  # a bug must never lose a message: defer it
            log.exception("%s: delivery raised an unexpected error", env.id)
            bug = TemporaryFailure(f"internal error in the relay: {e!r}")
            outcomes = [Outcome(r.address, bug.reply, bug) for r in pending]
        self.metrics.delivery_seconds.labels(server).observe(time.monotonic() - started)
        return outcomes

    async def _settle(self, env: Envelope, outcomes: list[Outcome]) -> None:
        server = self.settings.system_account.server
        now = time.time()
        settled = settle(env, outcomes, now, self.settings.queue)
        for rcpt, outcome, result in settled.results:
            if result == "ok":
                log.info("%s: to=<%s> server=%s status=sent (%s)", env.id, rcpt.address, server,
                         outcome.reply)
            elif result == "failed":
                log.warning("%s: to=<%s> server=%s status=failed (%s)", env.id, rcpt.address,
                            server, outcome.reply)
            if not isinstance(outcome.failure, Held):
                self.metrics.deliveries.labels(server, result).inc()
                self.recent.append(Result(now, env.id, rcpt.address, result, outcome.reply,
                                          env.subject))
        health = self.server_health(server)
        deferred = settled.deferred
        if settled.attempted:  # `queue show` lists the attempts
            env.remember(now, server, {rcpt.address: outcome.reply
                                       for rcpt, outcome, _ in settled.results})
        if any(o.failure is None for o in outcomes):
            health.succeeded(now)
        elif deferred and deferred[0].failure is not None:
            health.failed(deferred[0].failure, now)
        elif outcomes:
            health.answered()
        if settled.verdict == "dead":
            await self._bury(env)
        elif settled.verdict == "done":
            await self._disk.run(functools.partial(self.spool.finish, env.id, size=env.size))
            self._forget(env.id)
        else:
            log.info("%s: server=%s status=deferred attempt=%d retry_in=%.0fs (%s)", env.id,
                     server, env.attempts, env.next_attempt - now, env.last_reply)
            await asyncio.to_thread(self.spool.release, env)
            self.add(env)

    async def _bury(self, env: Envelope) -> None:
        await asyncio.to_thread(self.spool.release, env, "active", "dead")
        self._forget(env.id)
        self.dead += 1
        log.error("%s: dead letter: %s", env.id, env.dead_reason)
        if self.on_dead is not None:
            self.on_dead(env)

    def backoff(self, attempts: int) -> float:
        return backoff(self.settings.queue, attempts)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError):
        name = errno.errorcode.get(error.errno or 0, "")
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{f' [{name}]' if name else ''}{where}"
    return repr(error)
