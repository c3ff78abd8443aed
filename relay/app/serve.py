"""`serve`: the daemon's main loop around `Relay` (relay.app.lifecycle): signals, systemd.

Signal handlers are installed before start-up (a signal during start-up is handled,
not fatal) and removed after: SIGTERM/SIGINT stop (a second one exits at once),
SIGHUP reloads (one during start-up is applied once started), SIGUSR1 re-reads the
queue. systemd hears READY=1, RELOADING=1, STOPPING=1, the watchdog and the queue
counts in STATUS=. `run` sets the umask and the event loop and returns the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from relay import logs, systemd
from relay.app.lifecycle import Relay
from relay.errors import ConfigError, RelayError, SpoolError, StateLocked
from relay.listener.worker import loop_factory
from relay.settings import Settings

log = logging.getLogger("relay.app")


async def serve(settings: Settings, config_file: Path | None) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit code."""
    relay = Relay(settings, config_file)
    sd = systemd.Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    started = False
    reload_pending = False
    signals = 0

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second stop signal: exiting now")
            os._exit(1)
        stop.set()

    def on_reload() -> None:
        nonlocal reload_pending
        if not started:
            log.info("SIGHUP during start-up: the configuration is reloaded once started")
            reload_pending = True
            return
        sd.reloading()
        relay.reload()
        sd.ready(relay.status_line())

    handlers = {  # installed first, so a signal during start-up is handled, not fatal
        signal.SIGTERM: on_stop,
        signal.SIGINT: on_stop,
        signal.SIGHUP: on_reload,
        signal.SIGUSR1: lambda: started and loop.create_task(relay.rescan()),
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    passed = systemd.listen_sockets()  # socket activation (sysmail-relay.socket)
    try:
        await relay.start(passed[0] if passed else None)
    except (StateLocked, SpoolError, ConfigError, OSError) as e:
        log.error("cannot start: %s", e)
        relay.release()
        for sig in handlers:
            loop.remove_signal_handler(sig)
        return 1 if isinstance(e, StateLocked) else 2
    started = True
    sd.ready(relay.status_line())
    if reload_pending:
        on_reload()
    keepalive = asyncio.create_task(_systemd_keepalive(sd, relay), name="systemd")
    try:
        await stop.wait()
        sd.stopping()
        keepalive.cancel()
        await relay.stop()
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)
        sd.close()
    return 0


async def _systemd_keepalive(sd: systemd.Notifier, relay: Relay) -> None:
    """WATCHDOG=1 at half of WatchdogSec when set, and STATUS= with the queue counts."""
    if not sd.enabled:
        return
    interval = min(sd.watchdog_interval or 30.0, 30.0)
    while True:
        await asyncio.sleep(interval)
        if sd.watchdog_interval is not None:
            sd.watchdog()
        sd.status(relay.status_line())


def run(settings: Settings, config_file: Path | None) -> int:
    logs.configure(settings.log)
    # Whatever umask the daemon was started with, what it creates in state_dir is its
    # own: files and directories are created 0600/0700 explicitly, and this covers any
    # that a library or a later change creates without a mode.
    os.umask(0o077)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            return runner.run(serve(settings, config_file))
    except RelayError as e:
        log.error("%s", e)
        return 1
