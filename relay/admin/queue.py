"""`sysmail-relay queue list|show|retry|delete`: inspect and act on the spool.

`list` and `show` read the files, daemon running or not; quarantined entries (moved
aside as damaged) are listed and shown with their reason, `delete` removes them, and
`retry` refuses them, saying so.
An entry is changed by taking it into edit/ (the same claim-by-rename the scheduler
uses), changing it and putting it back: done by whoever holds the state directory's
lock (relay.spool.state).
`change`, for the command line: when the daemon holds the lock, the daemon does it
(a POST to its admin listener, whose address the lock file gives, as the page's
Retry and Delete buttons do); when nobody does, the command takes the lock (a
daemon starting meanwhile waits for it) and changes the files itself.
"""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from relay.admin import running
from relay.admin.status import quarantined
from relay.errors import DamagedEntry, RelayError, StateLocked
from relay.settings import Settings
from relay.spool.state import SERVE, Holder, StateLock
from relay.spool.store import Envelope, Place, Spool

Action = Literal["retry", "delete", "retry-all"]
DAEMON_WAIT = 15.0
"""How long a command waits for a daemon that holds the lock but does not answer yet
(starting, or stopping), and for another command that holds it."""


class QueueItemError(RelayError):
    """The queue entry does not exist or cannot be changed now."""


def entries(spool: Spool, held: str | None = None) -> list[dict[str, Any]]:
    """Every entry: waiting (queued, deferred, or held when `held` names why the server
    holds the mail: inactive, not granted, paused), sending, dead, damaged, quarantined."""
    now = time.time()
    rows: list[dict[str, Any]] = []
    places: tuple[Place, ...] = ("queue", "active", "dead")
    for place in places:
        for queue_id, env in spool.scan(place):
            if isinstance(env, DamagedEntry):
                rows.append({"id": queue_id, "state": "damaged", "reason": str(env)})
                continue
            state = {"active": "sending", "dead": "dead"}.get(place) or (
                "held" if held else "deferred" if env.next_attempt > now else "queued")
            left = [r for r in env.recipients if r.state == ("failed" if place == "dead"
                                                             else "pending")]
            rows.append({
                "id": queue_id, "state": state, "held_reason": held if state == "held" else None,
                "age": round(now - env.received_at), "received_at": env.received_at,
                "size": env.size, "sender": env.sender, "subject": env.subject,
                "recipients": [r.address for r in left], "attempts": env.attempts,
                "next_attempt": env.next_attempt if place == "queue" else None,
                "last_reply": env.dead_reason or env.last_reply,
            })
    rows.extend({"id": queue_id, "state": "quarantined", "reason": reason}
                for queue_id, reason in quarantined(spool))
    return rows


def show(spool: Spool, queue_id: str) -> dict[str, Any]:
    found = spool.find(queue_id)
    if found is None:
        reason = spool.quarantined(queue_id)
        if reason is not None:
            return {"id": queue_id, "place": "quarantine", "reason": reason,
                    "path": str(_quarantine_dir(spool, queue_id))}
        raise QueueItemError(f"no message {queue_id} in the queue, among the dead letters "
                             "or in quarantine")
    place, env = found
    return {"place": place, **asdict(env), "path": str(spool.message_path(queue_id, place))}


def _quarantine_dir(spool: Spool, queue_id: str) -> Path:
    root = spool.root / "quarantine"
    found = sorted(p for p in root.glob(f"{queue_id}*")
                   if p.name == queue_id or p.name.startswith(f"{queue_id}."))
    return found[-1] if found else root / queue_id


def _take(spool: Spool, queue_id: str) -> tuple[Place, Envelope]:
    places: tuple[Place, ...] = ("queue", "dead")
    for place in places:
        try:
            env = spool.claim(queue_id, place, "edit")
        except DamagedEntry as e:
            spool.quarantine(queue_id, "edit", str(e))
            raise QueueItemError(f"{queue_id} is damaged and was moved to quarantine: {e}"
                                 ) from None
        if env is not None:
            return place, env
    if spool.find(queue_id) is not None:
        raise QueueItemError(f"{queue_id} is being delivered right now; try again in a moment")
    reason = spool.quarantined(queue_id)
    if reason is not None:
        raise QueueItemError(
            f"{queue_id} is in quarantine, damaged on disk ({reason}), and cannot be sent "
            f"again: `sysmail-relay queue show {queue_id}` names its files (copy out what "
            f"you need), `sysmail-relay queue delete {queue_id}` removes it")
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
        try:
            env = spool.claim(queue_id, "queue", "edit")
        except DamagedEntry as e:
            spool.quarantine(queue_id, "edit", str(e))
            continue
        if env is not None:
            env.next_attempt = 0.0
            spool.release(env, "edit", "queue")
            done += 1
    return done


def delete(spool: Spool, queue_id: str) -> None:
    """Remove an entry for good: waiting, dead, or in quarantine."""
    if spool.find(queue_id) is None and spool.quarantined(queue_id) is not None:
        shutil.rmtree(_quarantine_dir(spool, queue_id))
        return
    _take(spool, queue_id)
    spool.finish(queue_id, "edit")


@dataclass
class Changed:
    """What `change` did: `place` the retried message came from ("queue", "dead"),
    `count` messages made due, and whether the running daemon did it."""

    place: str = ""
    count: int = 0
    by_daemon: bool = False


def change(settings: Settings, action: Action, queue_id: str | None = None) -> Changed:
    """Retry or delete one message, or retry every waiting one, through the daemon
    that holds the state directory, or here under its lock. Raises QueueItemError."""
    lock = StateLock(settings.state_dir)
    deadline = time.monotonic() + DAEMON_WAIT
    while True:
        try:
            lock.acquire(f"queue {action}", wait=DAEMON_WAIT)
        except FileNotFoundError:  # no state directory: no spool and no daemon
            return _apply(Spool(settings.spool_dir), action, queue_id)
        except PermissionError as e:
            raise QueueItemError(f"cannot open {lock.path}: {e.strerror}; run the command as "
                                 "the relay's user") from None
        except StateLocked as e:
            holder: Holder = e.holder
            if holder.role != SERVE:
                raise QueueItemError(str(e)) from None
            if holder.admin:
                try:
                    return _ask_daemon(settings, holder, action, queue_id)
                except OSError:
                    pass  # stopping or starting: its listener comes or the lock goes
            if time.monotonic() >= deadline:
                raise QueueItemError(
                    f"the relay (pid {holder.pid}) holds {settings.state_dir} but its admin "
                    f"listener {holder.admin or '(not listening yet)'} did not answer for "
                    f"{DAEMON_WAIT:.0f} s; try again once it has started (or stopped)") from None
            time.sleep(0.2)
            continue
        try:
            return _apply(Spool(settings.spool_dir), action, queue_id)
        finally:
            lock.release()


def _apply(spool: Spool, action: Action, queue_id: str | None) -> Changed:
    if action == "retry-all":
        return Changed(count=retry_all(spool))
    assert queue_id is not None
    if action == "retry":
        return Changed(place=retry(spool, queue_id), count=1)
    delete(spool, queue_id)
    return Changed()


def _ask_daemon(settings: Settings, holder: Holder, action: Action,
                queue_id: str | None) -> Changed:
    """POST the change to the daemon's admin listener (its page's buttons), as JSON.
    OSError when it does not answer."""
    path = "/queue/retry-all" if action == "retry-all" else \
        f"/queue/{urllib.parse.quote(queue_id or '', safe='')}/{action}"
    csrf = secrets.token_urlsafe(32)  # the page's double-submitted cookie
    headers = {"Cookie": f"relay_csrf={csrf}",
               "Content-Type": "application/x-www-form-urlencoded"}
    try:
        response, raw = running.ask(settings, holder.admin, "POST", path,
                                    urllib.parse.urlencode({"csrf": csrf}), headers, timeout=30)
    except http.client.HTTPException as e:
        raise ConnectionError(f"{holder.admin}: {e}") from None
    try:
        answer: dict[str, Any] = json.loads(raw)
    except ValueError:
        answer = {}
    if response.status == 200:
        return Changed(place=str(answer.get("place", "")), count=int(answer.get("count", 1)),
                       by_daemon=True)
    if response.status == 401:
        raise QueueItemError(f"the relay's admin listener {holder.admin} refused the command "
                             "(401): this configuration's admin.token or admin.token_file is "
                             "not the running relay's; use the same configuration file")
    if "error" in answer:
        raise QueueItemError(str(answer["error"]))
    raise QueueItemError(f"the relay's admin listener {holder.admin} answered HTTP "
                         f"{response.status} {response.reason} to POST {path}; see its log")


def release_held(settings: Settings) -> str:
    """Make waiting mail due now (it was held for the token): through the running
    daemon, or under the state directory's lock when none runs."""
    if not (settings.spool_dir / "queue").is_dir():
        return ""
    done = change(settings, "retry-all")
    if not done.count:
        return ""
    return f"{done.count} waiting messages are due now" + (
        "" if done.by_daemon else " (the daemon is not running: they go when it starts)")
