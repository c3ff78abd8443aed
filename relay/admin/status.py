"""The "System e-mail account details": what `status`, `/status` and the admin page show.

`collect` reads the configuration and the spool on disk, so it answers whether or
not the daemon runs; `render` is its text for `status`. What only the running
daemon knows comes from its `/status` (relay.admin.running). Never contains a
password, secret or token.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from relay.admin.fleet_view import fleet_lines
from relay.delivery.health import INACTIVE, NOT_GRANTED, describe
from relay.oauth.manager import authorization as oauth_authorization
from relay.oauth.manager import describe as describe_oauth
from relay.settings import LOCAL_SERVER, Settings, warnings
from relay.spool.store import Envelope, Spool

UNKNOWN = "unknown (the daemon is not running)"


def daemon_pid(settings: Settings) -> int | None:
    """The running daemon's pid from its pid file, or None."""
    try:
        pid = int((settings.state_dir / "relay.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def authentication(settings: Settings) -> str:
    server = settings.active_server
    if server is None:
        return "(Unused)"
    if server.auth is not None:
        return f"SMTP authentication {server.auth.method} as {server.auth.username}"
    if server.pop_before_smtp is not None:
        pop = server.pop_before_smtp
        how = "APOP" if pop.apop else "USER/PASS"
        return f"POP before SMTP ({how} as {pop.username} at {pop.host}:{pop.port})"
    if server.oauth is not None:
        how = "bearer token" if server.http else "XOAUTH2"
        return f"OAuth 2.0 ({how}), client {server.oauth.client}"
    return "(Unused)"


def held_reason(settings: Settings) -> str | None:
    """What the configuration and the token store alone say holds the mail: inactive,
    not granted (OAuth), or None. (A pause after refused logins only the daemon knows.)"""
    if not settings.system_account.active:
        return INACTIVE
    server = settings.active_server
    if server is not None and server.oauth is not None and \
            not oauth_authorization(settings, server.oauth.client).granted:
        return NOT_GRANTED
    return None


def quarantined(spool: Spool) -> list[tuple[str, str]]:
    """(queue id, reason) of every entry in quarantine/."""
    root = spool.root / "quarantine"
    try:
        names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    except FileNotFoundError:
        return []
    found: list[tuple[str, str]] = []
    for name in names:
        queue_id = name.partition(".")[0]
        try:
            reason = (root / name / "REASON").read_text(errors="replace").strip()
        except OSError:
            reason = f"no reason recorded in {root / name}"
        found.append((queue_id, reason))
    return found


def queue_counts(spool: Spool, held: bool, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    counts = {"queued": 0, "deferred": 0, "held": 0, "active": spool.count("active"),
              "dead": spool.count("dead"), "damaged": 0, "quarantined": len(quarantined(spool))}
    oldest: float | None = None
    for _, env in spool.scan("queue"):
        if not isinstance(env, Envelope):
            counts["damaged"] += 1
            continue
        state = "held" if held else ("deferred" if env.next_attempt > now else "queued")
        counts[state] += 1
        oldest = env.age_base if oldest is None else min(oldest, env.age_base)
    return {**counts, "oldest_seconds": round(now - oldest, 1) if oldest else 0.0}


def collect(settings: Settings) -> dict[str, Any]:
    account = settings.system_account
    server = settings.active_server
    details: dict[str, Any] = {
        "system_email_account": "Active" if account.active else "Inactive",
        "system_email_address": account.address,
        "email_server": account.server,
        "from_header": account.from_header,
        "authentication": authentication(settings),
    }
    if server is None:
        details.update(outgoing_server=f"built-in outbox {settings.outbox}", port=None,
                       encryption=None, timeout=None)
    else:
        http = server.http
        details.update(protocol=server.protocol_label, api=server.api_url if http else None,
                       outgoing_server=None if http else server.host,
                       port=None if http else server.port, encryption=server.encryption,
                       timeout=server.timeout, tls_verify=server.tls_verify)
        if server.oauth is not None:  # "OAuth authorization": Granted / Not granted
            auth = oauth_authorization(settings, server.oauth.client)
            details.update(oauth_authorization=auth.label, oauth=asdict(auth),
                           oauth_details=describe_oauth(auth),
                           oauth_credential=settings.oauth_clients[server.oauth.client]
                           .credential)
    pid = daemon_pid(settings)
    spool = Spool(settings.spool_dir)
    held = held_reason(settings)
    return {
        "account": details,
        "servers": [{"server": account.server, "state": held or UNKNOWN, "held": bool(held),
                     "paused_until": None, "last_error": None, "last_error_at": None,
                     "last_success": None, "next_attempt": None}],
        "queue": queue_counts(spool, held=held is not None)
        if Path(settings.spool_dir, "queue").is_dir() else None,
        "daemon": {"running": pid is not None, "pid": pid},
        "state_dir": str(settings.state_dir),
        "warnings": warnings(settings),
    }


_LABELS = [
    ("system_email_account", "System e-mail account"),
    ("system_email_address", "System e-mail address"),
    ("email_server", "E-mail server to be used"),
    ("protocol", "Protocol"),
    ("api", "API"),
    ("outgoing_server", "Outgoing e-mail server name (SMTP)"),
    ("port", "Outgoing e-mail server port number"),
    ("encryption", "Encryption"),
    ("timeout", "Time-out Period"),
    ("authentication", "Authentication"),
    ("oauth_credential", "OAuth credential"),
    ("oauth_details", "OAuth authorization"),
    ("from_header", "From: header"),
]
_ENCRYPTION = {"none": "Disable", "tls": "Use TLS", "starttls": "Use STARTTLS"}


def render(status: dict[str, Any]) -> str:
    account = status["account"]
    lines = [f"Warning: {status['configuration_file_invalid']}"] \
        if status.get("configuration_file_invalid") else []
    lines.append("System e-mail account details")
    for key, label in _LABELS:
        value = account.get(key)
        if value is None:
            continue
        if key == "encryption":
            value = _ENCRYPTION[value] + ("" if account.get("tls_verify", True)
                                          else " (certificate NOT verified: tls_verify = false)")
        if key == "timeout":
            value = f"{value} seconds"
        if key == "email_server" and value == LOCAL_SERVER:
            value = "local (built-in outbox)"
        lines.append(f"  {label:<36} {value}")
    lines.append("Servers")
    for server in status.get("servers", []):
        lines.extend(describe(server))
    queue = status["queue"]
    lines.append("Queue")
    if queue is None:
        lines.append("  (no spool yet: the relay has not run with this state_dir)")
    else:
        lines.append("  " + "  ".join(f"{k} {queue[k]}" for k in
                                      ("queued", "deferred", "held", "active", "dead")))
        if queue.get("quarantined"):
            lines.append(f"  {queue['quarantined']} in quarantine (`sysmail-relay queue list` "
                         "shows why; `queue show ID`, `queue delete ID`)")
        if queue["damaged"]:
            lines.append(f"  {queue['damaged']} damaged entries (the daemon quarantines them)")
        if queue["oldest_seconds"]:
            lines.append(f"  oldest waiting message: {queue['oldest_seconds']:.0f} s")
    lines.extend(fleet_lines(status.get("fleet")))
    for warning in status.get("warnings", []):
        lines.append(f"Warning: {warning}")
    daemon = status["daemon"]
    running = f"running, pid {daemon['pid']}" if daemon["running"] else "not running"
    lines.append(f"Daemon: {running} (state_dir {status['state_dir']})")
    if daemon.get("note"):
        lines.append(f"  {daemon['note']}")
    return "\n".join(lines)
