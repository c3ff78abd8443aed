"""`queue list` and `queue show` for people: a table and a readable summary.

The rows and the entry come from relay.queue_admin (`entries`, `show`); `--json`
prints those as they are, for scripts. Times are local; replies are shortened in
the table and shown whole by `queue show`.
"""

from __future__ import annotations

import time
from typing import Any

from relay.delivery.health import when

REPLY_WIDTH = 60
_HEADINGS = ("ID", "AGE", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "LEFT", "LAST REPLY")


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def shorten(text: str | None, width: int = REPLY_WIDTH) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def next_attempt(row: dict[str, Any], now: float) -> str:
    if row.get("held_reason"):
        return f"held: {row['held_reason']}"
    due = row.get("next_attempt")
    if due is None:
        return "-"
    if due <= now:
        return "now"
    same_day = time.localtime(due)[:3] == time.localtime(now)[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", time.localtime(due))


def table(rows: list[dict[str, Any]], now: float | None = None) -> str:
    """The queue as a table with a heading line; "the queue is empty" when it is."""
    if not rows:
        return "the queue is empty"
    now = time.time() if now is None else now
    lines: list[tuple[str, ...]] = [_HEADINGS]
    for row in rows:
        if row["state"] in ("damaged", "quarantined"):
            lines.append((row["id"], "-", row["state"], "-", "-", "-", shorten(row["reason"])))
            continue
        lines.append((row["id"], age(row["age"]), row["state"], str(row["attempts"]),
                      next_attempt(row, now), str(len(row["recipients"])),
                      shorten(row["last_reply"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADINGS) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)),
                                line[-1]]).rstrip() for line in lines)


def summary(entry: dict[str, Any]) -> str:
    """One entry (queue_admin.show) for people: times as dates, every attempt it remembers
    with the server's reply, every recipient with its state and the last reply for it."""
    if entry["place"] == "quarantine":
        return "\n".join([f"Message {entry['id']}: quarantined",
                          f"  reason        {entry['reason']}",
                          f"  files         {entry['path']}",
                          "  (`sysmail-relay queue delete ID` removes it for good)"])
    state = {"queue": "waiting", "active": "being sent", "edit": "being changed",
             "dead": "dead letter"}.get(entry["place"], entry["place"])
    lines = [f"Message {entry['id']}: {state}",
             f"  received      {when(entry['received_at'])} from {entry['client'] or 'local'}"
             f" (HELO {entry.get('helo') or '-'}, {entry.get('protocol', 'ESMTP')})",
             f"  sender        <{entry['sender']}>",
             f"  subject       {entry['subject'] or '(none)'}",
             f"  size          {entry['size']} bytes",
             *_attempts(entry)]
    if entry["place"] == "queue":
        due = entry["next_attempt"]
        lines.append(f"  next attempt  {when(due) if due > time.time() else 'now'}")
    if entry.get("last_reply"):
        lines.append(f"  last reply    {entry['last_reply']}")
    if entry.get("dead_reason"):
        lines.append(f"  dead because  {entry['dead_reason']}")
    if entry.get("crashes"):
        lines.append(f"  interrupted   {entry['crashes']} times in a row")
    lines.append("  recipients")
    for rcpt in entry["recipients"]:
        reply = f"  {rcpt['reply']}" if rcpt.get("reply") else ""
        lines.append(f"    {rcpt['state']:<9} <{rcpt['address']}>{reply}")
    lines.append(f"  files         {entry['path']}")
    return "\n".join(lines)


def _attempts(entry: dict[str, Any]) -> list[str]:
    """The attempt count, then one line per remembered attempt: when, server, reply."""
    history: list[dict[str, Any]] = entry.get("history") or []
    count = entry["attempts"]
    lines = [f"  attempts      {count}" + (
        f" (the last {len(history)} below)" if len(history) < count and history else
        " (not listed: received by an earlier version)" if count and not history else "")]
    lines.extend(f"    {when(a['at'])}  {a['server']}  {a['reply']}" for a in history)
    return lines
