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


Call = tuple[Callable[[], object], Callable[[], None] | None]
"""A call for `DiskWork`, and the sync to run after it (None: none)."""


class DiskWork(AwaitedWorker[Call, object]):
    """Runs the page-cache work of deliveries (a claim with its read, a removal) in one
    thread, taking every call waiting at once: under load a batch costs one thread
    wake-up and one wake-up of the event loop, not two per message. A call may name a
    sync to follow it (a claim: `Spool.sync`, an fsync of active/): each such sync runs
    once per batch, after all its calls, and a call whose sync fails gets its OSError.
    What waits for the disk otherwise (a deferral, a dead letter) goes to
    asyncio.to_thread."""

    NAME = "delivery-spool"

    def results(self, args: list[Call]) -> list[object | Exception]:
        done: list[object | Exception] = []
        for call, _ in args:
            try:
                done.append(call())
            except Exception as e:  # that call's caller gets it
                done.append(e)
        wanted = {sync for (_, sync), result in zip(args, done, strict=True)
                  if sync is not None and not isinstance(result, Exception)}
        for sync in wanted:
            try:
                sync()
            except OSError as e:
                done = [e if then == sync and not isinstance(result, Exception) else result
                        for (_, then), result in zip(args, done, strict=True)]
        return done

    async def run(self, call: Callable[[], T], then: Callable[[], None] | None = None) -> T:
        """`call`'s result in the thread's next batch, after `then` (once for the batch)."""
        return cast(T, await self.call((call, then)))
