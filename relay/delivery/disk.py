"""What deliveries keep beside the spool: the file-system work of many deliveries run
in one thread, and the latest per-recipient results the admin page shows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from relay.spool.batches import AwaitedWorker

T = TypeVar("T")


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
    the disk itself (fsync: a deferral, a dead letter) goes to asyncio.to_thread."""

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
