"""The fleet as `status` and the page show it, from /status's "fleet" (relay.fleet.node):
whether Redis answers, the live relays with their queue counts and last heartbeat."""

from __future__ import annotations

import time
from typing import Any


def fleet_lines(fleet: dict[str, Any] | None, now: float | None = None) -> list[str]:
    """Lines for `sysmail-relay status`; none without `[fleet]`."""
    if not fleet:
        return []
    now = time.time() if now is None else now
    lines = ["Fleet"]
    if fleet["connected"]:
        lines.append(f"  Redis {fleet['url']}: connected; this relay is {fleet['node']}; "
                     f"{len(fleet['members'])} relays alive")
    else:
        lines.append(f"  Redis {fleet['url']}: NOT REACHABLE for {now - fleet['since']:.0f} s "
                     f"({fleet.get('last_error') or 'no answer'}); delivering with a local "
                     f"share of the limits (1/{fleet['size']}); mail is still accepted")
    if account := fleet.get("account"):
        state = "active" if account["active"] else "INACTIVE (mail is held on every relay)"
        at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(account["at"])))
        lines.append(f"  account {state}, as set on {account['by']} at {at}")
    for client, holder in sorted((fleet.get("refresh_lock") or {}).items()):
        lines.append(f"  OAuth client {client}: {holder} is refreshing the token")
    for member in fleet["members"]:
        queue = member.get("queue") or {}
        counts = "  ".join(f"{k} {queue[k]}" for k in ("queued", "deferred", "held", "active")
                           if k in queue)
        seen = max(0.0, now - float(member.get("last_seen", now)))
        me = " (this relay)" if member.get("node") == fleet["node"] else ""
        lines.append(f"  {member.get('node')}{me}: {counts or 'no queue yet'}; seen "
                     f"{seen:.0f} s ago, version {member.get('version')}")
    return lines
