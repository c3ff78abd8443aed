"""The "System e-mail account details": what `status`, `/status` and the admin page show.

`collect` reads the configuration and the spool on disk, so it answers whether or
not the daemon runs. What only the running daemon knows (per server: its state,
the last error with its time, the next attempt, the last success; see
relay.health) comes from its `/status`: `report` asks the daemon that holds the
state directory through its admin listener (the lock file names it, relay.state)
and falls back to `collect`, saying that the daemon does not run. Never contains
a password, secret or token.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.parse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from relay.delivery.health import INACTIVE, NOT_GRANTED, describe
from relay.errors import ConfigError
from relay.oauth.manager import authorization as oauth_authorization
from relay.oauth.manager import describe as describe_oauth
from relay.settings import LOCAL_SERVER, Settings, admin_token, read_config_file, validate, warnings
from relay.spool.state import LOCK_FILE, SERVE, Holder
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
        return f"OAuth 2.0 (XOAUTH2), client {server.oauth.client}"
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


def held_now(settings: Settings) -> str | None:
    """Why the sending server holds the mail now (inactive, not granted, paused), from
    the running daemon when it answers, else from the configuration; None: not held."""
    for server in report(settings).get("servers", []):
        if server.get("held") and server.get("server") == settings.system_account.server:
            return str(server["state"])
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
        details.update(outgoing_server=server.host, port=server.port,
                       encryption=server.encryption, timeout=server.timeout,
                       tls_verify=server.tls_verify)
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


def report(settings: Settings) -> dict[str, Any]:
    """The running daemon's /status, or `collect` with `daemon.note` saying why not."""
    holder = _holder(settings)
    note = "the daemon is not running: the servers' health is not known, queue counts " \
           "are from the spool"
    if holder is not None and holder.role == SERVE and not holder.admin:
        note = (f"the daemon (pid {holder.pid}) is starting: the servers' health is not "
                "known yet, queue counts are from the spool")
    if holder is not None and holder.role == SERVE and holder.admin:
        try:
            live = daemon_status(settings, holder.admin)
            live["daemon"]["source"] = f"the running daemon ({holder.admin}/status)"
            return live
        except (OSError, ValueError, http.client.HTTPException) as e:
            note = (f"the daemon (pid {holder.pid}) did not answer at {holder.admin}/status "
                    f"({e}): the servers' health is not known, queue counts are from the spool")
    found = collect(settings)
    found["daemon"]["note"] = note
    return found


def despite_invalid(path: Path | None, error: ConfigError) -> tuple[Settings, str] | None:
    """When the configuration file is invalid but a daemon runs on its state directory
    (a reload was refused, so it runs the configuration it loaded before): settings
    that find that daemon and the spool (state_dir, admin), and what to tell the
    operator first. None when no daemon runs there."""
    settings = _findable(path)
    holder = _holder(settings)
    if holder is None or holder.role != SERVE:
        return None
    problems = "; ".join(error.problems)
    return settings, (
        f"the configuration file {path or '(built-in)'} is invalid ({problems}); the "
        f"daemon (pid {holder.pid}) still runs the configuration it loaded before, and what "
        "follows is from it and the spool. Fix the file, check it with `sysmail-relay "
        "check`, then reload (SIGHUP, `systemctl reload sysmail-relay`)")


def _findable(path: Path | None) -> Settings:
    """From an invalid file: its state_dir and [admin] where they are valid themselves."""
    try:
        raw = read_config_file(path)
    except ConfigError:  # not even TOML: look for the line
        text = path.read_text(errors="replace") if path is not None and path.is_file() else ""
        found = re.search(r'^\s*state_dir\s*=\s*"([^"]+)"', text, re.M)
        raw = {"state_dir": found.group(1)} if found else {}
    for keys in (("state_dir", "admin"), ("state_dir",), ()):
        try:
            return validate({k: raw[k] for k in keys if k in raw}, str(path))
        except ConfigError:
            continue
    return Settings()


def _holder(settings: Settings) -> Holder | None:
    """Who holds the state directory's lock, as its lock file says, if that one lives."""
    try:
        with open(settings.state_dir / LOCK_FILE, "rb") as f:
            holder = Holder.parse(f.read(256))
    except OSError:
        return None
    if holder.pid is None:
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return holder


def daemon_status(settings: Settings, admin: str) -> dict[str, Any]:
    """GET /status from the daemon's admin listener. OSError, ValueError or
    HTTPException when it does not answer with JSON."""
    url = urllib.parse.urlsplit(admin)
    headers = {"Accept": "application/json"}
    token = admin_token(settings.admin)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.request("GET", "/status", headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    if response.status != 200:
        hint = ": this configuration's admin token is not the daemon's" \
            if response.status == 401 else ""
        raise ValueError(f"HTTP {response.status} {response.reason}{hint}")
    answer: dict[str, Any] = json.loads(raw)
    return answer


_LABELS = [
    ("system_email_account", "System e-mail account"),
    ("system_email_address", "System e-mail address"),
    ("email_server", "E-mail server to be used"),
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
    for warning in status.get("warnings", []):
        lines.append(f"Warning: {warning}")
    daemon = status["daemon"]
    running = f"running, pid {daemon['pid']}" if daemon["running"] else "not running"
    lines.append(f"Daemon: {running} (state_dir {status['state_dir']})")
    if daemon.get("note"):
        lines.append(f"  {daemon['note']}")
    return "\n".join(lines)
