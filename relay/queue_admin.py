"""`sysmail-relay queue list|show|retry|delete`: inspect and act on the spool.

Works on the files directly, daemon running or not. An entry is taken by renaming
it into edit/ (the same claim-by-rename the scheduler uses), changed, and put
back; the running daemon is then told (SIGUSR1) to re-read the queue.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict
from typing import Any

from .errors import DamagedEntry, RelayError
from .settings import Settings
from .spool import Envelope, Place, Spool
from .status import daemon_pid


class QueueItemError(RelayError):
    """The queue entry does not exist or cannot be changed now."""


def entries(spool: Spool) -> list[dict[str, Any]]:
    now = time.time()
    rows: list[dict[str, Any]] = []
    places: tuple[Place, ...] = ("queue", "active", "dead")
    for place in places:
        for queue_id, env in spool.scan(place):
            if isinstance(env, DamagedEntry):
                rows.append({"id": queue_id, "state": "damaged", "reason": str(env)})
                continue
            state = {"active": "sending", "dead": "dead"}.get(place) or \
                ("deferred" if env.next_attempt > now else "queued")
            rows.append({
                "id": queue_id, "state": state, "age": round(now - env.received_at),
                "size": env.size, "sender": env.sender, "subject": env.subject,
                "recipients": [r.address for r in env.recipients], "attempts": env.attempts,
                "last_reply": env.dead_reason or env.last_reply,
            })
    return rows


def show(spool: Spool, queue_id: str) -> dict[str, Any]:
    found = spool.find(queue_id)
    if found is None:
        raise QueueItemError(f"no message {queue_id} in the queue or among the dead letters")
    place, env = found
    return {"place": place, **asdict(env), "path": str(spool.message_path(queue_id, place))}


def _take(spool: Spool, queue_id: str) -> tuple[Place, Envelope]:
    places: tuple[Place, ...] = ("queue", "dead")
    for place in places:
        env = spool.claim(queue_id, place, "edit")
        if env is not None:
            return place, env
    if spool.find(queue_id) is not None:
        raise QueueItemError(f"{queue_id} is being delivered right now; try again in a moment")
    raise QueueItemError(f"no message {queue_id} in the queue or among the dead letters")


def retry(spool: Spool, queue_id: str) -> str:
    """Make one entry due now; a dead letter comes back with its failed recipients pending."""
    place, env = _take(spool, queue_id)
    env.next_attempt = 0.0
    if place == "dead":
        for rcpt in env.recipients:
            if rcpt.state == "failed":
                rcpt.state = "pending"
        env.dead_reason = None
        env.crashes = 0
        env.age_base = time.time()
    spool.release(env, "edit", "queue")
    return place


def retry_all(spool: Spool) -> int:
    """Make every waiting (deferred) entry due now. Dead letters stay: retry them by id."""
    done = 0
    for queue_id in spool.ids("queue"):
        env = spool.claim(queue_id, "queue", "edit")
        if env is not None:
            env.next_attempt = 0.0
            spool.release(env, "edit", "queue")
            done += 1
    return done


def delete(spool: Spool, queue_id: str) -> None:
    _take(spool, queue_id)
    spool.finish(queue_id, "edit")


def notify_daemon(settings: Settings) -> bool:
    """Ask the running daemon to re-read the queue. False when none runs."""
    pid = daemon_pid(settings)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True
