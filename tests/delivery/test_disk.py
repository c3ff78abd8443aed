"""The delivery thread's batches: one fsync of active/ for all the claims of a batch."""

from __future__ import annotations

import asyncio
import errno
import threading

from relay.delivery.disk import DiskWork


class Place:
    """A stand-in for `Spool.sync`: records its calls among the batch's."""

    def __init__(self, events: list[str], fails: bool = False) -> None:
        self.events = events
        self.fails = fails

    def sync(self) -> None:
        self.events.append("sync")
        if self.fails:
            raise OSError(errno.EIO, "Input/output error")


async def batch_behind_a_blocked_call(work: DiskWork, events: list[str],
                                      calls: list[tuple[str, Place | None]]) -> list[object]:
    """Run `calls` as one batch: the first call holds the thread until all are handed over."""
    release = threading.Event()
    first = asyncio.ensure_future(work.run(lambda: release.wait(10)))

    def call(name: str) -> str:
        events.append(name)
        if name.startswith("bad"):
            raise ValueError(name)
        return name

    pending = [asyncio.ensure_future(work.run(lambda n=name: call(n),  # type: ignore[misc]
                                              None if place is None else place.sync))
               for name, place in calls]
    await asyncio.sleep(0)  # every call handed over
    release.set()
    await first
    return await asyncio.gather(*pending, return_exceptions=True)


async def test_the_claims_of_a_batch_share_one_sync_after_all_of_them() -> None:
    events: list[str] = []
    active = Place(events)
    results = await batch_behind_a_blocked_call(
        DiskWork(), events, [("claim1", active), ("finish", None), ("claim2", active),
                             ("claim3", active)])
    assert results == ["claim1", "finish", "claim2", "claim3"]
    assert events == ["claim1", "finish", "claim2", "claim3", "sync"]


async def test_a_failed_sync_fails_the_claims_of_its_batch_only() -> None:
    events: list[str] = []
    active = Place(events, fails=True)
    results = await batch_behind_a_blocked_call(
        DiskWork(), events, [("claim1", active), ("finish", None), ("bad claim", active)])
    assert isinstance(results[0], OSError) and results[0].errno == errno.EIO
    assert results[1] == "finish"
    assert isinstance(results[2], ValueError)  # its own error, not the sync's


async def test_a_batch_without_claims_syncs_nothing() -> None:
    events: list[str] = []
    assert await batch_behind_a_blocked_call(DiskWork(), events, [("finish", None)]) == [
        "finish"]
    assert events == ["finish"]

