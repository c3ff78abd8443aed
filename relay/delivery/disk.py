"""What deliveries keep beside the spool: the file-system work of many deliveries run
in one thread, and the latest per-recipient results the admin page shows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from relay.spool.batches import AwaitedWorker, Worker

T = TypeVar("T")

log = logging.getLogger("relay.delivery")


@dataclass(frozen=True)
class Result:
    """One recipient's result of one attempt, kept in memory for the admin page."""

    at: float
    queue_id: str
    recipient: str
    result: str
    """ok, deferred or failed, as in relay_deliveries_total."""
    reply: str
    subject: str | None


class DiskWork(AwaitedWorker[Callable[[], object], object]):
    """Runs the page-cache work of deliveries (a claim with its read, a removal) in one
    thread, taking every call waiting at once: under load a batch costs one thread
    wake-up and one wake-up of the event loop, not two per message. What waits for
    the disk itself (fsync: a deferral, a dead letter) goes to asyncio.to_thread, or,
    for claims, to `ClaimSync`."""

    NAME = "delivery-spool"

    def results(self, args: list[Callable[[], object]]) -> list[object | Exception]:
        done: list[object | Exception] = []
        for call in args:
            try:
                done.append(call())
            except Exception as e:  # that call's caller gets it
                done.append(e)
        return done

    async def run(self, call: Callable[[], T]) -> T:
        return cast(T, await self.call(call))


class ClaimSync(Worker[Callable[[], None]]):
    """Makes claims durable (`Spool.sync`: an fsync of active/) in a thread of its own,
    once for every claim handed over while the last sync ran.

    Where a rename becomes durable by halves (a file system without a metadata journal),
    a claim's queue/ half may reach the disk with the next commit's fsync of queue/
    while its active/ half is still only in memory: a power cut then would lose the
    message. This sync closes that window soon after the claim, without the delivery
    waiting for it: a directory fsync (a few ms) on the claim's path made deliveries
    20-35 % slower (bench/results/HISTORY.md). ext4, xfs and btrfs journal a rename
    whole and do not need it. A failed sync is logged; the disk's trouble shows again
    at the next commit, which refuses mail rather than acknowledge it unsynced."""

    NAME = "claim-sync"

    def handle(self, batch: list[Callable[[], None]]) -> None:
        for sync in dict.fromkeys(batch):
            try:
                sync()
            except OSError as e:
                log.error("spool: cannot make claimed messages durable (fsync of the active "
                          "directory: %s); messages being delivered may be lost at a power "
                          "cut until the disk works again", e.strerror or e)
