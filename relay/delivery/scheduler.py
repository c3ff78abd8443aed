"""The delivery scheduler: drains the spool through the upstream.

It keeps the queue's index (relay.delivery.index: which entry is due when, built at
start-up while the listener already accepts), starts the deliveries that are due,
and decides what becomes of each entry after its attempt (relay.delivery.attempt):
removed once the upstream has it, deferred with exponential backoff
(`queue.retry_initial` doubling up to `queue.retry_max`) on 4xx, timeouts,
connection and authentication failures, a dead letter when older than
`queue.max_age` (the pure policy: relay.delivery.retry). While the system account
is inactive nothing is sent. Each attempt feeds the server's health
(relay.delivery.health); mail waiting while the server is inactive, not granted or
paused counts as `held`. When the spool itself refuses (EIO, EACCES, ENOSPC) or the
relay has a bug, the entry is put back as it was and waits with the same backoff
(relay.delivery.trouble). No exception leaves a delivery task.

Every file-system call of a delivery runs in a thread: one hop to claim the entry
and read a small message, one to remove it once delivered, both in batches of the
delivery thread, with one fsync of active/ for a batch of claims
(relay.delivery.disk); what waits for the disk (a deferral, a dead letter) in
asyncio's threads. So that the connections never wait for the disk, up to twice as
many deliveries as there are connections run at once (`pool_size` send, as many
more read or remove their entries, or wait for a connection). No more: every entry
in `active` at a crash counts as interrupted (queue.max_crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable

from relay.delivery.attempt import claim, record, send
from relay.delivery.disk import ClaimSync, DiskWork, Result
from relay.delivery.health import HELD_STATES, ServerHealth, Servers
from relay.delivery.index import QueueIndex
from relay.delivery.retry import backoff
from relay.delivery.trouble import Troubles
from relay.errors import DamagedEntry
from relay.metrics import Metrics
from relay.settings import Settings
from relay.spool.store import Envelope, Spool
from relay.upstream.base import Outcome, Upstream

log = logging.getLogger("relay.delivery")

UpstreamFactory = Callable[[Settings], Upstream]
_LOCAL_POOL = 4
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
        self._wake = asyncio.Event()
        self.index = QueueIndex(spool, self._wake.set)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._disk = DiskWork()
        self.claim_sync = ClaimSync()
        self._troubles = Troubles()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self.recent: deque[Result] = deque(maxlen=RECENT)
        self.on_dead: Callable[[Envelope], None] | None = None
        """Called with each message that has just become a dead letter (queue.notify)."""
        gauges = metrics.queue_messages
        gauges.labels("queued").set_function(lambda: self.counts()["queued"])
        gauges.labels("deferred").set_function(lambda: self.counts()["deferred"])
        gauges.labels("held").set_function(lambda: self.counts()["held"])
        gauges.labels("dead").set_function(lambda: self.dead)
        metrics.queue_oldest_seconds.set_function(self.oldest_age)
        self.health = Servers(metrics.upstream_up, self._paused_until)
        """Per server (by name): what the attempts through it said (relay.delivery.health)."""
        self.server_health()

    # --- the index (relay.delivery.index) ---------------------------------------------

    async def load(self) -> None:
        """Index every waiting entry (`QueueIndex.load`); `run` starts sending once done."""
        await self.index.load(lambda: self._stopping)

    async def rescan(self) -> None:
        """Re-read queue/ after the command line retried or deleted entries."""
        for queue_id in await self.index.rescan(self._inflight):
            self._troubles.forget(queue_id)

    def add(self, env: Envelope) -> None:
        self.index.add(env.id, env.next_attempt, env.age_base)

    def add_entry(self, queue_id: str, due: float, age_base: float) -> None:
        """`add` of an entry known by its id and times (an intake worker's notice)."""
        self.index.add(queue_id, due, age_base)

    def _forget(self, queue_id: str) -> None:
        self.index.forget(queue_id)
        self._troubles.forget(queue_id)

    @property
    def dead(self) -> int:
        return self.index.dead

    @property
    def held(self) -> bool:
        return not self.settings.system_account.active

    def server_health(self, name: str | None = None) -> ServerHealth:
        """The health record of a server (default: the sending one)."""
        return self.health.of(name or self.settings.system_account.server)

    def _paused_until(self, name: str) -> float:
        return self.upstream.not_before() if name == self.upstream.name else 0.0

    def server_state(self) -> str:
        """The sending server's state (relay.delivery.health): ok, failing, paused, not granted,
        inactive."""
        return self.server_health().state(active=not self.held,
                                          paused_until=self.upstream.not_before(),
                                          now=time.time())

    def health_report(self) -> list[dict[str, object]]:
        """Every server's state, last error, next attempt, last success (for /status)."""
        waiting = self.index.waiting(self._inflight)
        return self.health.reports(self.server_health().server, active=not self.held,
                                   paused_until=self.upstream.not_before(),
                                   next_attempt=min(waiting) if waiting else None)

    def counts(self) -> dict[str, int]:
        held = self.server_state() in HELD_STATES
        return {**self.index.counts(self._inflight, held, time.time()),
                "active": len(self._inflight)}

    def oldest_age(self) -> float:
        return self.index.oldest_age(time.time())

    # --- running --------------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        server = self.settings.active_server
        return _READ_AHEAD * (server.pool_size if server is not None else _LOCAL_POOL)

    async def run(self) -> None:
        await self.index.loaded.wait()
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
        while len(self._inflight) < self._capacity:
            queue_id, delay = self.index.pop_due(now, self._inflight)
            if queue_id is None:
                return delay
            task = asyncio.create_task(self._deliver(queue_id), name=f"deliver-{queue_id}")
            self._inflight[queue_id] = task
            self._idle.clear()
            task.add_done_callback(functools.partial(self._forget_task, queue_id))
        return None  # a finished delivery wakes the loop (no timer spinning at 0 s)

    def _forget_task(self, queue_id: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self._defer_in_trouble(queue_id, error, "internal error in the relay")
        self._done(queue_id)

    def _done(self, queue_id: str) -> None:
        self._inflight.pop(queue_id, None)
        self.index.requeue(queue_id)  # deferred: its new time may have been popped meanwhile
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
        """One delivery: whatever goes wrong in the relay itself, the entry goes back to
        the queue and waits (`_trouble`); nothing escapes the task."""
        try:
            await self._deliver_entry(queue_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._trouble(queue_id, e, "internal error in the relay")

    async def _deliver_entry(self, queue_id: str) -> None:
        claiming = asyncio.ensure_future(
            self._disk.run(functools.partial(claim, self.spool, self.upstream, queue_id)))
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
        self.claim_sync.submit(self.spool.sync)  # durable soon; the delivery does not wait
        env = claimed.envelope
        troubled = queue_id in self._troubles
        try:
            outcomes = await send(claimed, self.settings, self.upstream, self.metrics)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self.spool.put_back, env.id))
            raise
        try:
            await self._settle(env, outcomes)
        except OSError as e:  # disk full, I/O error: the upstream may have it already
            await self._trouble(env.id, e, "cannot record the delivery result in the spool "
                                           "(the message may arrive twice)")
            return
        self._troubles.forget(queue_id)
        if troubled:
            log.info("%s: the spool works again for this message", queue_id)

    async def _trouble(self, queue_id: str, error: Exception, what: str) -> None:
        """Put a taken entry back as it is (a rename: needs no free space) and let it wait."""
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.spool.put_back, queue_id)
        self._defer_in_trouble(queue_id, error, what)

    def _defer_in_trouble(self, queue_id: str, error: BaseException, what: str) -> None:
        """Back off an entry the relay could not handle (relay.delivery.trouble)."""
        delay = self._troubles.record(queue_id, error, what, self.backoff, self.spool.root)
        self.index.defer(queue_id, time.time() + delay)  # `_done` puts it back on the heap

    async def _settle(self, env: Envelope, outcomes: list[Outcome]) -> None:
        settled = record(env, outcomes, self.settings, self.metrics, self.recent,
                         self.server_health())
        if settled.verdict == "dead":
            await self._bury(env)
        elif settled.verdict == "done":
            await self._disk.run(functools.partial(self.spool.finish, env.id, size=env.size))
            self._forget(env.id)
        else:
            await asyncio.to_thread(self.spool.release, env)
            self.add(env)

    async def _bury(self, env: Envelope) -> None:
        await asyncio.to_thread(self.spool.release, env, "active", "dead")
        self._forget(env.id)
        self.index.dead += 1
        log.error("%s: dead letter: %s", env.id, env.dead_reason)
        if self.on_dead is not None:
            self.on_dead(env)

    def backoff(self, attempts: int) -> float:
        return backoff(self.settings.queue, attempts)
