"""Start-up: the spool put in order after any stop, kill -9 and power loss included.

What was being received never got its 250 and is removed; delivered entries whose
removal a crash interrupted are removed; entries claimed by a delivery (active/) or
by `queue retry` (edit/) go back to the queue, counting the interruption, or become
dead letters after `queue.max_crashes` of them; damaged entries and planted symbolic
links are quarantined, never followed; saved envelopes and temporary files whose
entry is gone are removed. An entry in active/ or edit/ that is the very file of the
same ID in queue/ or dead/ (a move whose two halves did not both reach the disk: a
power cut, where renames are not atomic across a crash) keeps only that other name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.errors import DamagedEntry
from relay.spool.removal import remove_tree
from relay.spool.store import ENVELOPES, Place, Spool


@dataclass
class Recovery:
    """What start-up found: entries put back, dead after too many crashes, removed, quarantined."""

    requeued: list[str] = field(default_factory=list)
    crashed_out: list[str] = field(default_factory=list)
    removed_incoming: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)


def recover(spool: Spool, max_crashes: int, backoff: Callable[[int], float] | None = None
            ) -> Recovery:
    """Put the spool in order after any stop, kill -9 included.

    An entry whose delivery was interrupted waits `backoff(crashes)` seconds before
    it is tried again, so a message in flight at every kill is not always first.
    """
    report = Recovery()
    for name in os.listdir(spool.place_dir("incoming")):
        remove_tree(spool.place_dir("incoming") / name)
        report.removed_incoming += 1
    for name in os.listdir(spool.place_dir("trash")):
        remove_tree(spool.place_dir("trash") / name)
        with contextlib.suppress(OSError):
            os.unlink(spool.saved_path(name))
    places: tuple[Place, ...] = ("edit", "active")
    for place in places:
        _drop_second_names(spool, place)
        for queue_id, env in list(spool.scan(place)):
            try:  # a planted symbolic link: quarantined, its target never written
                spool.refuse_link(spool.place_dir(place) / queue_id)
            except DamagedEntry as e:
                env = e
            except FileNotFoundError:
                continue
            if isinstance(env, DamagedEntry):
                spool.quarantine(queue_id, place, str(env))
                report.quarantined.append((queue_id, str(env)))
                continue
            if place == "active":
                env.crashes += 1
            if env.crashes >= max_crashes:
                env.dead_reason = (f"delivery was interrupted {env.crashes} times "
                                   "(the relay stopped or crashed while sending it)")
                spool.release(env, place, "dead")
                report.crashed_out.append(queue_id)
            else:
                if place == "active" and backoff is not None:
                    env.next_attempt = time.time() + backoff(env.crashes)
                spool.release(env, place, "queue")
                report.requeued.append(queue_id)
    _remove_strays(spool)
    return report

def _drop_second_names(spool: Spool, place: Place) -> None:
    """Remove the names in `place` of entries that are the same file in queue/ or dead/."""
    for queue_id in spool.ids(place):
        here = spool.place_dir(place) / queue_id
        for other in ("queue", "dead"):
            with contextlib.suppress(OSError):
                a, b = os.lstat(here), os.lstat(spool.place_dir(other) / queue_id)
                if stat.S_ISREG(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                    os.unlink(here)
                    break


def _remove_strays(spool: Spool) -> None:
    """Saved envelopes and marks whose entry is gone (delivered before a crash ended
    their removal), and temporary files of writes a crash interrupted."""
    places: tuple[Place, ...] = ("queue", "active", "edit", "dead")
    for name in os.listdir(spool.place_dir(ENVELOPES)):
        queue_id = name.split(".")[0] if not name.startswith(".") else ""
        if queue_id and any(os.path.lexists(spool.place_dir(p) / queue_id) for p in places):
            continue
        remove_tree(spool.place_dir(ENVELOPES) / name)
