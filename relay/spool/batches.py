"""Threads that do the spool's file system work in batches, beside the event loop.

A `Worker` takes whatever was handed to it since its last round, all at once: the
cost of waking a thread (and of the GIL changing hands) is paid once per batch,
not per message. The thread ends after a while idle and starts again on demand.
An `AwaitedWorker` also gives each caller its own result, waking each event loop
once per batch.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")


class Worker(ABC, Generic[T]):
    IDLE = 2.0
    MAX_BATCH = 1 << 30
    NAME = "worker"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[T] = []
        self._busy = False
        self._running = False

    def submit(self, item: T) -> None:
        with self._cond:
            self._pending.append(item)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name=self.NAME, daemon=True).start()
            elif len(self._pending) == 1:  # the thread may be waiting for work
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(self.IDLE)
                if not self._pending:
                    self._running = False
                    return
                batch = self._pending[:self.MAX_BATCH]
                del self._pending[:self.MAX_BATCH]
                self._busy = True
            try:
                self.handle(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    @abstractmethod
    def handle(self, batch: list[T]) -> None:
        """In the thread: do the work for everything in `batch`."""

    def wait(self, timeout: float = 10.0) -> bool:
        """True once everything handed over so far is handled (for tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)


_Call = tuple[A, asyncio.AbstractEventLoop, asyncio.Future[R]]


class AwaitedWorker(Worker[_Call[A, R]], Generic[A, R]):
    async def call(self, arg: A) -> R:
        """`arg`'s result (or its exception), from the thread's next batch."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self.submit((arg, loop, done))
        return await done

    @abstractmethod
    def results(self, args: list[A]) -> list[R | Exception]:
        """In the thread: one result, or the exception to raise, per argument."""

    def handle(self, batch: list[_Call[A, R]]) -> None:
        try:
            results = self.results([arg for arg, _, _ in batch])
        except Exception as e:  # a bug must not stop the others: fail this batch, go on
            results = [e] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop,
                      list[tuple[asyncio.Future[R], R | Exception]]] = {}
        for (_, loop, done), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((done, result))
        for loop, settled in by_loop.items():  # one wake-up of each loop per batch
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[R], R | Exception]]) -> None:
    for done, result in settled:
        if done.cancelled():
            continue
        if isinstance(result, Exception):
            done.set_exception(result)
        else:
            done.set_result(result)
