"""The running daemon, as the command line reaches it: `status`, and what `queue` and
`send-test` ask first.

What only the running daemon knows (per server: its state, the last error with its
time, the next attempt, the last success; relay.delivery.health) comes from its
`/status`: `report` asks the daemon that holds the state directory through its
admin listener (the lock file names it, relay.spool.state) and falls back to
`relay.admin.status.collect`, saying why. `despite_invalid` finds that daemon even
when the configuration file has become invalid since it loaded it. `ask` is the one
request to its admin listener, with this configuration's token (`queue retry|delete`
use it too, relay.admin.queue).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from relay.admin.status import collect
from relay.errors import ConfigError
from relay.settings import Settings, admin_token, read_config_file, validate
from relay.spool.state import LOCK_FILE, SERVE, Holder


def held_now(settings: Settings) -> str | None:
    """Why the sending server holds the mail now (inactive, not granted, paused), from
    the running daemon when it answers, else from the configuration; None: not held."""
    for server in report(settings).get("servers", []):
        if server.get("held") and server.get("server") == settings.system_account.server:
            return str(server["state"])
    return None


def report(settings: Settings) -> dict[str, Any]:
    """The running daemon's /status, or `collect` with `daemon.note` saying why not."""
    holder = lock_holder(settings)
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
    holder = lock_holder(settings)
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


def lock_holder(settings: Settings) -> Holder | None:
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


def ask(settings: Settings, admin: str, method: str, path: str, body: str | None = None,
        headers: dict[str, str] | None = None, timeout: float = 10
        ) -> tuple[http.client.HTTPResponse, bytes]:
    """One request to the daemon's admin listener at `admin` (its URL), with this
    configuration's admin token: the response and its body. OSError or HTTPException
    when it does not answer."""
    url = urllib.parse.urlsplit(admin)
    headers = {"Accept": "application/json", **(headers or {})}
    token = admin_token(settings.admin)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def daemon_status(settings: Settings, admin: str) -> dict[str, Any]:
    """GET /status from the daemon's admin listener. OSError, ValueError or
    HTTPException when it does not answer with JSON."""
    response, raw = ask(settings, admin, "GET", "/status")
    if response.status != 200:
        hint = ": this configuration's admin token is not the daemon's" \
            if response.status == 401 else ""
        raise ValueError(f"HTTP {response.status} {response.reason}{hint}")
    answer: dict[str, Any] = json.loads(raw)
    return answer
