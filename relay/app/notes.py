"""What the daemon says about itself: the event loop for the start-up line, the queue
in one line for systemd's STATUS=, and the warnings of a reload that changed what only
a restart applies."""

from __future__ import annotations

import asyncio
import importlib.metadata

from relay.listener.cpus import worker_count
from relay.settings import Settings


def loop_name() -> str:
    """The running event loop, for the start-up line: "uvloop 0.23.0" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    if module == "uvloop":
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return module


def status_line(counts: dict[str, int], active: bool) -> str:
    """Queue counts in one line, for systemd's STATUS=."""
    state = "" if active else "account inactive, "
    return (f"{state}{counts['queued']} queued, {counts['deferred']} deferred, "
            f"{counts['held']} held, {counts['active']} sending, {counts['dead']} dead")


def restart_needed(old: Settings, new: Settings, workers: int) -> list[str]:
    """What a reload from old to new leaves as it was until a restart; workers: how many
    intake processes run now."""
    found = []
    if worker_count(new.listener.workers) != workers:
        found.append(f"listener.workers changed: restart the relay to run "
                     f"{new.listener.workers} intake processes")
    if (old.listener.host, old.listener.port) != (new.listener.host, new.listener.port):
        found.append(f"listener.host/port changed: restart the relay to listen on "
                     f"{new.listener.host}:{new.listener.port}")
    if (old.admin.host, old.admin.port) != (new.admin.host, new.admin.port):
        found.append(f"admin.host/port changed: restart the relay to serve the admin "
                     f"listener on {new.admin.host}:{new.admin.port}")
    if old.fleet != new.fleet:
        found.append("[fleet] changed: restart the relay to join or leave the fleet with "
                     "the new settings")
    if old.event_loop != new.event_loop:
        found.append(f"event_loop changed: restart the relay to run on {new.event_loop}")
    return found
