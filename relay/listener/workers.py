"""Intake on every core: the parent's side of `listener.workers` intake processes.

The parent binds the listening socket (or takes systemd's) and starts N workers
(relay.listener.worker), each a fresh interpreter (`python -m`, never a fork of
this process, which runs threads and an event loop) that inherits the socket, the
shared connection slots and its end of a channel. All of them accept on the one
socket, each with its own event loop, aiosmtpd server and group commit into the
spool; the parent keeps the state directory's lock, delivery, OAuth and the admin
listener, and learns of each new entry from the worker's channel (one line per
group commit), so nothing polls the spool.

- A worker that ends when it was not told to is replaced (logged; after a pause that
  doubles, up to 30 s, while replacements die at once), and the parent re-reads the
  queue: entries it committed just before it died, whose notice was lost, are sent.
- `reconfigure` (SIGHUP) sends the new settings to every worker; sessions that
  start afterwards use them, none is dropped. listener.host, port and workers
  need a restart, as in one process.
- `stop_accepting` (SIGTERM) tells every worker to drain; `drain` waits for them.
- `listener.max_connections` holds for all of them (relay.listener.slots); each
  worker's metrics are summed by the parent's /metrics (prometheus-client's
  multiprocess mode, files in <state_dir>/metrics, emptied at start).

How many workers "auto" means: relay.listener.cpus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import RelayError
from relay.listener.slots import SLOTS, SharedSlots
from relay.listener.worker import SERVE, frame
from relay.settings import Settings

log = logging.getLogger("relay.listener")

READY_WAIT = 30.0
RESTART_MAX = 30.0
STEADY = 10.0
"""A worker that ran this long before it ended is replaced at once."""


@dataclass
class _Proc:
    place: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    started: float
    ready: asyncio.Future[tuple[str, int]]
    serving: asyncio.Future[None]
    told: bool = False
    """Told to stop (SIGTERM): its end is no loss."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Workers:
    """The intake processes, for `relay.app.Relay` (in place of one `Listener`)."""

    def __init__(self, settings: Settings, count: int, metrics_dir: Path, grace: float,
                 on_queued: Callable[[str, float, float], None],
                 on_lost: Callable[[], None], lock_fd: int) -> None:
        self.settings = settings
        self.lock_fd = lock_fd
        """The state directory's lock, inherited by every worker: a worker left behind
        by a killed parent holds it until it has finished, so no new relay recovers the
        spool under it."""
        self.count = count
        self.metrics_dir = metrics_dir
        self.grace = grace
        self.on_queued = on_queued
        self.on_lost = on_lost
        self.address: tuple[str, int] | None = None
        self.slots: SharedSlots | None = None
        self._sockets: list[socket.socket] = []
        self._procs: dict[int, _Proc] = {}
        self._stopping = False
        self._delay = 0.0
        self._spawning: set[asyncio.Task[None]] = set()

    @staticmethod
    def prepare_metrics(path: Path) -> None:
        """An empty directory for the workers' metric files (a previous run's removed)."""
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (or take `sock`), start the workers and wait until each one accepts.
        Raises OSError (cannot bind) or RelayError (a worker did not start)."""
        cfg = self.settings.listener
        if sock is not None:
            self._sockets = [sock]
        else:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(asyncio.Protocol, cfg.host, cfg.port,
                                              reuse_address=True, start_serving=False)
            self._sockets = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
            server.close()
        for s in self._sockets:  # listening from when the workers serve
            s.setblocking(False)
        bound = self._sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        self.slots = SharedSlots.create()
        procs = [await self._spawn() for _ in range(self.count)]
        try:
            for proc in procs:
                await self._ready(proc)
        except BaseException:
            self.stop_accepting()
            await self.drain(1.0)
            raise
        for proc in procs:  # all at once, when all are ready
            proc.writer.write(frame(SERVE))
        for proc in procs:
            await self._ready(proc, serving=True)
        log.info("listening on %s port %d with %d intake processes (pids %s)",
                 *self.address, len(procs), ", ".join(str(p.process.pid) for p in procs))

    async def _ready(self, proc: _Proc, serving: bool = False) -> None:
        """Wait until `proc` is ready to accept (`serving`: accepts). RelayError if it
        ends or takes too long."""
        try:
            await asyncio.wait_for(asyncio.shield(proc.serving if serving else proc.ready),
                                   READY_WAIT)
        except (TimeoutError, asyncio.CancelledError, EOFError):
            raise RelayError(f"intake worker {proc.place} (pid {proc.process.pid}) did not "
                             f"start (exit code {proc.process.returncode}): see the lines "
                             "above") from None

    def _free_place(self) -> int:
        return next(i for i in range(SLOTS) if i not in self._procs)

    async def _spawn(self, place: int | None = None) -> _Proc:
        assert self.slots is not None
        place = self._free_place() if place is None else place
        self.slots.clear(place)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in self._sockets]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.listener.worker", str(theirs.fileno()),
                str(self.slots.fd), str(place), str(self.grace), *map(str, fds),
                pass_fds=(theirs.fileno(), self.slots.fd, self.lock_fd, *fds),
                stdin=asyncio.subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        mine.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        loop = asyncio.get_running_loop()
        proc = _Proc(place, process, writer, loop.time(), loop.create_future(),
                     loop.create_future())
        self._procs[place] = proc
        writer.write(frame(self.settings))
        proc.tasks.append(asyncio.create_task(self._watch(proc, reader),
                                              name=f"intake-worker-{place}"))
        proc.tasks.append(asyncio.create_task(self._reap(proc),
                                              name=f"intake-worker-{place}-exit"))
        return proc

    @staticmethod
    async def _reap(proc: _Proc) -> None:
        """Once the worker has exited, its channel ends: `_watch` reads what is left,
        then the end of file. Should that not come (seen with a worker killed while it
        started), the channel is closed here after a second, so `_watch` ends and the
        worker is replaced; a notice lost so is made good by the queue's re-read that
        follows a lost worker (`on_lost`)."""
        await proc.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.tasks[0]), 1.0)
        if not proc.tasks[0].done():
            log.warning("intake worker %d (pid %d) exited without closing its channel: "
                        "closed here", proc.place, proc.process.pid)
            proc.writer.close()

    async def _watch(self, proc: _Proc, reader: asyncio.StreamReader) -> None:
        """Read the worker's notices until its channel ends; then see it exit."""
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "queued" in message:
                for queue_id, due, age_base in message["queued"]:
                    self.on_queued(str(queue_id), float(due), float(age_base))
            elif "ready" in message and not proc.ready.done():
                proc.ready.set_result(tuple(message["ready"]))
            elif "serving" in message and not proc.serving.done():
                proc.serving.set_result(None)
        code = await proc.process.wait()
        proc.writer.close()
        for started in (proc.ready, proc.serving):
            if not started.done():
                started.set_exception(EOFError())
        self._ended(proc, code)

    def _ended(self, proc: _Proc, code: int) -> None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            proc.process.pid, str(self.metrics_dir))
        self._procs.pop(proc.place, None)
        if self.slots is not None:
            self.slots.clear(proc.place)
        if proc.told or self._stopping:
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        loop = asyncio.get_running_loop()
        lived = loop.time() - proc.started
        self._delay = 0.0 if lived >= STEADY else min(max(self._delay * 2, 0.5), RESTART_MAX)
        log.error("intake worker %d (pid %d) ended (%s) after %.1f s; starting another%s",
                  proc.place, proc.process.pid, how, lived,
                  f" in {self._delay:.1f} s" if self._delay else "")
        self.on_lost()
        self._later(proc.place)

    async def _replace(self, place: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            proc = await self._spawn(place)
        except OSError as e:  # not even started: try again, later each time
            self._delay = min(max(self._delay * 2, 0.5), RESTART_MAX)
            log.error("intake worker %d could not be started (%s); trying again in %.1f s",
                      place, e, self._delay)
            self._later(place)
            return
        try:  # one that starts and ends is replaced when it ends (`_ended`)
            await self._ready(proc)
            proc.writer.write(frame(SERVE))
            await self._ready(proc, serving=True)
        except RelayError as e:
            log.error("intake worker %d could not be started: %s", place, e)
            return
        log.info("intake worker %d (pid %d) accepting", place, proc.process.pid)

    def _later(self, place: int) -> None:
        task = asyncio.get_running_loop().create_task(self._replace(place, self._delay))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    def reconfigure(self, settings: Settings) -> None:
        """New settings for every worker, for the sessions that start after this."""
        self.settings = settings
        data = frame(settings)
        for proc in self._procs.values():
            if not proc.writer.is_closing():
                proc.writer.write(data)

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self._procs.values()]

    def stop_accepting(self) -> None:
        """Tell every worker to stop accepting and finish its sessions (SIGTERM)."""
        self._stopping = True
        for task in self._spawning:
            task.cancel()
        for proc in self._procs.values():
            proc.told = True
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
        for s in self._sockets:  # the workers' copies close as they stop accepting
            s.close()

    async def drain(self, grace: float) -> None:
        """Wait for the workers to finish (a little longer than their own `grace`), then
        end any that did not."""
        tasks: Sequence[asyncio.Task[None]] = [t for p in self._procs.values() for t in p.tasks]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace + 5.0)
            for proc in list(self._procs.values()):
                log.error("intake worker %d (pid %d) did not finish in time: killed",
                          proc.place, proc.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
            if late:
                await asyncio.wait(late, timeout=5.0)
        if self.slots is not None:
            self.slots.close()
            self.slots = None
