"""`queue.notify`: a short report when a message becomes a dead letter.

The report (original sender, recipients with the server's reply for each, subject,
the reason) goes into the spool like any accepted message and is delivered through
the same upstream. At most one report per message: a marker file is created in the
dead entry's directory before the report is queued, and it travels with the entry
(a message retried from the dead letters that dies again is not reported twice).
A report about a report is never sent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate

from relay.settings import Settings
from relay.spool.store import Envelope, Recipient, Spool, new_queue_id

log = logging.getLogger("relay.notify")

REPORT_CLIENT = "sysmail-relay (dead-letter report)"
"""The `client` of a report's envelope: how a report is known, so none is sent about it."""
MARKER = "notified"


def build_report(dead: Envelope, settings: Settings, to: str) -> tuple[Envelope, bytes]:
    """The report about one dead letter, as an envelope and the message bytes."""
    sender = settings.system_account.address or "relay@localhost"
    domain = sender.rpartition("@")[2] or socket.gethostname()
    queue_id = new_queue_id()
    subject = f"Undelivered notification: {dead.subject or '(no subject)'}"
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr(("sysmail-relay", sender))
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = f"<{queue_id}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Sysmail-Relay-Dead-Letter"] = dead.id
    lines = [
        f"The relay gave up on message {dead.id}: it is now a dead letter.",
        "",
        f"Original sender: <{dead.sender}>",
        f"Subject:         {dead.subject or '(no subject)'}",
        f"Received:        {formatdate(dead.received_at, localtime=True)}",
        f"Attempts:        {dead.attempts}",
        "Recipients:",
        *(f"  <{r.address}>: {r.state}" + (f" ({r.reply})" if r.reply else "")
          for r in dead.recipients),
        "",
        f"The server's last reply: {dead.dead_reason or dead.last_reply or '(none)'}",
        "",
        "The message stays in the spool. To send it again once the cause is fixed:",
        f"  sysmail-relay queue retry {dead.id}",
        "or use the Retry button on the admin page; to remove it:",
        f"  sysmail-relay queue delete {dead.id}",
    ]
    msg.set_content("\n".join(lines) + "\n")
    data = msg.as_bytes()
    env = Envelope(id=queue_id, sender="", recipients=[Recipient(to)], mail_from=sender,
                   size=len(data), client=REPORT_CLIENT, subject=subject)
    return env, data


def queue_report(spool: Spool, settings: Settings, dead: Envelope) -> Envelope | None:
    """Queue the report about a dead letter, unless one was queued before. Blocking."""
    to = settings.queue.notify
    if to is None or dead.client == REPORT_CLIENT:
        return None
    if not spool.mark_once(dead.id, "dead", MARKER):
        return None  # reported before (at most one report per message), or retried or
                     # deleted in the meantime
    env, data = build_report(dead, settings, to)
    spool.store(env, data)
    return env


class Notifier:
    """Sends the dead-letter reports of a running relay, off the delivery path."""

    def __init__(self, spool: Spool, settings: Callable[[], Settings],
                 queued: Callable[[Envelope], None]) -> None:
        self._spool = spool
        self._settings = settings
        self._queued = queued
        self._tasks: set[asyncio.Task[None]] = set()

    def dead_letter(self, env: Envelope) -> None:
        """Scheduler hook: a message has just become a dead letter."""
        if self._settings().queue.notify is None or env.client == REPORT_CLIENT:
            return
        self._track(asyncio.get_running_loop().create_task(self._report(env)))

    def recovered(self, queue_ids: list[str]) -> None:
        """Start-up put these entries among the dead letters (interrupted too often)."""
        if queue_ids and self._settings().queue.notify is not None:
            self._track(asyncio.get_running_loop().create_task(self._read_and_report(queue_ids)))

    async def _read_and_report(self, queue_ids: list[str]) -> None:
        for queue_id in queue_ids:
            try:
                env = await asyncio.to_thread(self._spool.read, queue_id, "dead")
            except OSError:  # retried, deleted or damaged meanwhile
                continue
            await self._report(env)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, dead: Envelope) -> None:
        settings = self._settings()
        try:
            env = await asyncio.to_thread(queue_report, self._spool, settings, dead)
        except OSError as e:
            log.error("%s: cannot queue the dead-letter report to <%s>: %s", dead.id,
                      settings.queue.notify, e)
            return
        if env is not None:
            log.info("%s: dead-letter report %s queued for <%s>", dead.id, env.id,
                     settings.queue.notify)
            self._queued(env)

    async def close(self) -> None:
        """Let reports being queued finish (they are short disk writes)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
