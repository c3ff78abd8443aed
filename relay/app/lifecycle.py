"""The daemon's lifecycle: start-up, reload, shutdown (the main loop: relay.app.serve).

start: take the state directory's lock (relay.state; a second `serve` on the same
state_dir exits 1 naming the holder, before it touches anything), open and recover
the spool, load the delivery index, bind the listener (in this process with
`listener.workers = 1`, else the intake workers of relay.listener.workers), start
the scheduler, write the pid file. SIGTERM/SIGINT: stop accepting, let sessions and
deliveries in flight finish (bounded), remove the pid file, drop the lock last, exit; a
second signal stops at once. SIGHUP: reload the configuration (a bad one is refused and
the running one kept; one during start-up is applied once started). SIGUSR1: re-read
the queue (after a change to the spool made outside the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import logs
from relay.admin import queue as queue_admin
from relay.admin.server import AdminServer
from relay.app.notes import loop_name, restart_needed, status_line
from relay.delivery.notices import Notifier
from relay.delivery.retry import backoff
from relay.delivery.scheduler import Scheduler, UpstreamFactory
from relay.errors import ConfigError, RelayError, SpoolError
from relay.listener.cpus import worker_count
from relay.listener.server import Listener
from relay.listener.workers import Workers
from relay.metrics import Metrics, intake_collector
from relay.oauth.manager import Authorization, OAuth
from relay.settings import LOCAL_SERVER, OVERRIDES_FILE, Settings, load_settings, warnings
from relay.spool import state
from relay.spool.recovery import recover
from relay.spool.store import Envelope, Spool
from relay.upstream.choose import make_upstream
from relay.upstream.outbox import LocalOutbox

if TYPE_CHECKING:
    from relay.fleet import Fleet

log = logging.getLogger("relay.app")

SHUTDOWN_GRACE = 10.0
PID_FILE = state.PID_FILE
LOCK_WAIT = 10.0
"""How long start-up waits for a `queue retry|delete` that holds the state directory's
lock for a moment (another `serve` holding it is not waited for)."""


class Relay:
    def __init__(self, settings: Settings, config_file: Path | None = None,
                 upstreams: UpstreamFactory | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.workers = worker_count(settings.listener.workers)
        self.metrics = Metrics(intake=self.workers == 1)  # else summed from the workers'
        # every series at 0 from the first scrape
        self.metrics.declare(settings.metric_series(), settings.oauth_clients)
        self.oauth = OAuth(settings, self.metrics)
        self.oauth.on_granted.append(self._oauth_granted)
        self.fleet: Fleet | None = None
        if settings.fleet is not None:  # redis is imported only for a fleet
            from relay.fleet import Fleet
            self.fleet = Fleet(settings, self.metrics, self._counts)
            self.fleet.account.on_account = self._fleet_account
            self.fleet.share_tokens(self.oauth)  # with token_key_file: one token for all
            self.fleet.on_token_granted = self._fleet_token_granted
        self.make_upstream: UpstreamFactory = upstreams or functools.partial(
            make_upstream, metrics=self.metrics, oauth=self.oauth, fleet=self.fleet)
        self.spool = Spool(settings.spool_dir)
        self.lock = state.StateLock(settings.state_dir)
        self.scheduler: Scheduler | None = None
        self.listener: Listener | Workers | None = None
        self.admin: AdminServer | None = None
        self.notifier = Notifier(self.spool, lambda: self.settings, self._queued)
        self.stopping = False
        self._run_task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._oauth_task: asyncio.Task[None] | None = None

    @property
    def pid_file(self) -> Path:
        return self.settings.state_dir / PID_FILE

    @property
    def listener_address(self) -> tuple[str, int] | None:
        """Where the SMTP listener accepts (`relay.admin.daemon.Daemon`)."""
        return None if self.listener is None else self.listener.address

    async def start(self, listen_socket: socket.socket | None = None) -> None:
        """Raises StateLocked (another process holds state_dir), SpoolError, ConfigError
        or OSError when the relay cannot start."""
        self.admin = AdminServer(self)  # refuses a non-loopback admin.host without a token
        await asyncio.to_thread(self._prepare_state)
        recovery = await asyncio.to_thread(
            recover, self.spool, self.settings.queue.max_crashes,
            functools.partial(backoff, self.settings.queue))
        if recovery.requeued or recovery.removed_incoming or recovery.crashed_out:
            log.warning("spool recovered: %d put back in the queue, %d unfinished receptions "
                        "removed, %d dead after repeated interruptions",
                        len(recovery.requeued), recovery.removed_incoming,
                        len(recovery.crashed_out))
        for warning in warnings(self.settings):
            log.warning("%s", warning)
        for queue_id, reason in recovery.quarantined:
            log.error("%s: moved to quarantine: %s", queue_id, reason)
        self.scheduler = Scheduler(self.spool, self.settings, self.metrics, self.make_upstream)
        self.scheduler.on_dead = self.notifier.dead_letter
        self.notifier.recovered(recovery.crashed_out)
        if self.workers > 1:
            metrics_dir = self.settings.state_dir / "metrics"
            await asyncio.to_thread(Workers.prepare_metrics, metrics_dir)
            self.metrics.registry.register(intake_collector(str(metrics_dir)))
            self.listener = Workers(self.settings, self.workers, metrics_dir, SHUTDOWN_GRACE,
                                    self.scheduler.add_entry, self._worker_lost,
                                    self.lock.fileno())
        else:
            self.listener = Listener(self.settings, self.spool, self.metrics.intake,
                                     self._queued)
        await self.listener.start(listen_socket)
        try:
            await self.admin.start()
        except OSError:
            self.listener.stop_accepting()
            raise
        if self.fleet is not None:  # before sending: the fleet may hold the account
            await self.fleet.start()  # Redis or not: the relay starts, the heartbeat retries
        # The queue's index is read while the listener already accepts: a large queue
        # delays sending, never receiving.
        self._load_task = asyncio.create_task(self.scheduler.load(), name="queue-index")
        self._run_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        self._oauth_task = asyncio.create_task(self.oauth.run(), name="oauth-keep-alive")
        self._publish()
        log.info("sysmail-relay started: account %s <%s> via %s; event loop %s; reading the "
                 "queue's index",
                 "active" if self.settings.system_account.active else "INACTIVE (mail is held)",
                 self.settings.system_account.address, self.settings.system_account.server,
                 loop_name())

    def _prepare_state(self) -> None:
        try:
            state.private_dir(self.settings.state_dir, follow=True)  # StateDirectory= links
        except OSError as e:
            raise SpoolError(f"cannot create state_dir {self.settings.state_dir}: {e.strerror}; "
                             "create it for the relay's user or set state_dir") from None
        try:  # before anything in state_dir changes: recovery must not run on a live spool
            self.lock.acquire(state.SERVE, wait=LOCK_WAIT)
        except OSError as e:
            raise SpoolError(f"cannot lock the state directory ({self.lock.path}): "
                             f"{e.strerror}; make state_dir writable by the relay's user "
                             "and remove anything else of that name") from None
        self.spool.open()
        if self.settings.system_account.server == LOCAL_SERVER:
            try:
                LocalOutbox(self.settings.outbox).ensure()
            except OSError as e:
                raise SpoolError(f"cannot create the outbox {self.settings.outbox}: "
                                 f"{e.strerror}") from None

    def _publish(self) -> None:
        """Once serving: the lock file names the admin listener (where `queue retry|delete`
        reach the daemon) and the SMTP listener (where `sendmail` finds it), and the pid
        file is written, by the lock's holder only."""
        admin = self.admin.address if self.admin is not None else None
        smtp = self.listener.address if self.listener is not None else None
        self.lock.note(state.Holder(os.getpid(), state.SERVE,
                                    f"http://{state.dialable(admin)}" if admin else "",
                                    state.dialable(smtp) if smtp else ""))
        state.write_atomically(self.pid_file, f"{os.getpid()}\n".encode(), sync=False)

    def release(self) -> None:
        """Remove the pid file and drop the lock (after `stop`, or a failed start)."""
        if self.lock.held:
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
            self.lock.release()

    def _counts(self) -> dict[str, int]:
        return self.scheduler.counts() if self.scheduler is not None else {}

    def fleet_status(self) -> dict[str, Any] | None:
        """The fleet as this relay sees it (`[fleet]`), None without one."""
        return self.fleet.status() if self.fleet is not None else None

    def activate(self, active: bool) -> None:
        """Activate / Deactivate chosen on the page (the reload that follows applies it
        here); with [fleet], for every relay of the fleet."""
        if self.fleet is not None:
            self.fleet.account.chosen(active)

    def _fleet_token_granted(self, client: str) -> None:
        """Signed in on another relay of the fleet: held mail is due now."""
        asyncio.get_running_loop().create_task(self._release_held())

    def _fleet_account(self, active: bool, by: str) -> None:
        """Another relay of the fleet activated or deactivated the account."""
        from relay.fleet.account import with_active
        if active == self.settings.system_account.active or self.scheduler is None:
            return
        self.settings = with_active(self.settings, active)
        self.scheduler.reconfigure(self.settings)
        log.warning("system account %s on %s (fleet): %s", "activated" if active else
                    "deactivated", by, "sending" if active else "mail is held")

    def _queued(self, env: Envelope) -> None:
        assert self.scheduler is not None
        self.scheduler.add(env)

    def _worker_lost(self) -> None:
        """An intake worker died: what it committed without telling us is in the queue."""
        if not self.stopping:
            asyncio.get_running_loop().create_task(self.rescan())

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        log.info("stopping: no new connections; finishing what is in flight (up to %.0f s)",
                 grace)
        self.stopping = True
        if self.listener is not None:
            self.listener.stop_accepting()
            await self.listener.drain(grace)
        if self.scheduler is not None:
            await self.scheduler.stop(grace)
        for task in (self._load_task, self._run_task, self._oauth_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.fleet is not None:
            await self.fleet.stop()
        await self.notifier.close()
        await asyncio.to_thread(self.spool.close)  # writes of messages being received end
        if self.admin is not None:
            await self.admin.stop()
        self.release()
        log.info("stopped")

    def reload(self) -> bool:
        """Apply a new configuration; keep the running one if it is invalid."""
        try:
            new = load_settings(self.config_file, self.settings.state_dir / OVERRIDES_FILE)
            if new.state_dir != self.settings.state_dir:
                raise ConfigError([f"state_dir cannot change while running "
                                   f"({self.settings.state_dir} -> {new.state_dir}); restart"])
        except ConfigError as e:
            self.metrics.config_reloads.labels("error").inc()
            log.error("configuration reload refused, the running configuration stays: %s",
                      "; ".join(e.problems))
            return False
        if self.fleet is not None:  # Activate / Deactivate here is for the whole fleet
            new = self.fleet.account.reloaded(new)
        old, self.settings = self.settings, new
        logs.configure(new.log)
        assert self.listener is not None and self.scheduler is not None
        if isinstance(self.listener, Workers):
            self.listener.reconfigure(new)  # each worker, for its sessions from now on
        else:
            self.listener.settings = new
        for warning in restart_needed(old, new, self.workers):
            log.warning("%s", warning)
        self.oauth.reconfigure(new)
        self.scheduler.reconfigure(new)
        self.metrics.config_reloads.labels("ok").inc()
        # a server or client added: its series at 0 at once
        self.metrics.declare(new.metric_series(), new.oauth_clients)
        for warning in warnings(new):  # the same as at start-up
            log.warning("%s", warning)
        log.info("configuration reloaded: account %s <%s> via %s",
                 "active" if new.system_account.active else "INACTIVE (mail is held)",
                 new.system_account.address, new.system_account.server)
        return True

    async def rescan(self) -> None:
        assert self.scheduler is not None
        await self.scheduler.rescan()

    def status_line(self) -> str:
        """Queue counts in one line, for systemd's STATUS=."""
        if self.scheduler is None:
            return "starting"
        return status_line(self.scheduler.counts(), self.settings.system_account.active)

    def _oauth_granted(self, auth: Authorization) -> None:
        """A new authorization (the admin page's sign-in): held mail is due now."""
        asyncio.get_running_loop().create_task(self._release_held())

    async def _release_held(self) -> None:
        try:
            count = await asyncio.to_thread(queue_admin.retry_all, self.spool)
            await self.rescan()
        except (OSError, RelayError) as e:
            log.error("OAuth authorization granted, but the waiting mail could not be made "
                      "due now (%s): it goes at its next retry", e)
            return
        log.info("OAuth authorization granted: %d waiting messages are due now", count)

