"""Where `sendmail` and `send-test` hand their mail: which listener, in this order.

1. The listener the configuration names: `[listener] host` or `port` written in the
   file in use (`--config`, `$RELAY_CONFIG`, /etc/sysmail-relay/relay.toml), or
   `RELAY_LISTENER__HOST` / `__PORT`. What the operator wrote wins: in a container
   the daemon's own view of its address ("0.0.0.0") may not be the caller's.
2. Else the daemon that serves the configuration's state directory, at the address
   its lock file records (relay.spool.state): a daemon started with `--config` on another
   port, or on a socket systemd passed it, is found by a caller that names no
   configuration. When nothing names the state directory (no `state_dir`,
   `RELAY_STATE_DIR` or `$STATE_DIRECTORY`), the systemd unit's
   /var/lib/sysmail-relay is looked at after the caller's own default.
3. Else the built-in default, 127.0.0.1:2525.

A caller who cannot read a state directory (mode 0700, the relay's user) goes on to
the next step: nothing of the daemon's is needed to hand it mail.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from relay.errors import ConfigError
from relay.settings import ListenerSettings, Settings, default_state_dir, load_settings
from relay.spool import state

SYSTEMD_STATE_DIR = Path("/var/lib/sysmail-relay")
"""StateDirectory= of systemd/sysmail-relay.service."""


@dataclass(frozen=True)
class Target:
    """Where `sendmail` hands mail: the listener, and the system address for a From: line."""

    host: str
    port: int
    address: str


def listener_address(settings: Settings, env: Mapping[str, str] | None = None
                     ) -> tuple[str, int]:
    """The listener these settings lead to (the module's docstring says how)."""
    env = os.environ if env is None else env
    explicit = bool(settings.listener.model_fields_set & {"host", "port"})
    return _choose(settings.listener, explicit, settings.state_dir,
                   "state_dir" in settings.model_fields_set or "STATE_DIRECTORY" in env)


def _choose(listener: ListenerSettings, explicit: bool, state_dir: Path,
            state_dir_named: bool) -> tuple[str, int]:
    if not explicit:
        places = [state_dir] if state_dir_named else \
            list(dict.fromkeys([state_dir, SYSTEMD_STATE_DIR]))
        for place in places:
            holder = state.serving(place)
            if holder is not None and (found := _parse(holder.listener)) is not None:
                return found
    return _connectable(listener.host), listener.port


def _parse(address: str) -> tuple[str, int] | None:
    """"127.0.0.1:2525" or "[::1]:2525" as (host, port); None when it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def _connectable(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def sendmail_target(config: Path | None, env: Mapping[str, str] | None = None) -> Target:
    """The listener for this configuration (the module's docstring says which). Raises
    ConfigError.

    The whole configuration when this user can read it; else only its [listener] table
    and state_dir (and RELAY_LISTENER__HOST/PORT, RELAY_STATE_DIR): a program calling
    sendmail runs as any user, and the relay's secrets (password_file, systemd
    credentials) are none of its business.
    """
    env = os.environ if env is None else env
    try:
        settings = load_settings(config)
        return Target(*listener_address(settings, env), settings.system_account.address or "")
    except ConfigError as full:
        try:
            data = tomllib.loads(config.read_text("utf-8")) if config is not None else {}
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            raise full from None
        table = data.get("listener")
        raw = {k: v for k, v in table.items() if k in ("host", "port")} \
            if isinstance(table, dict) else {}
        for key in ("host", "port"):
            if value := env.get(f"RELAY_LISTENER__{key.upper()}"):
                raw[key] = value
        try:
            listener = ListenerSettings(**raw)
        except ValidationError:
            raise full from None
        named = env.get("RELAY_STATE_DIR") or data.get("state_dir")
        state_dir = Path(named) if isinstance(named, str) and named else default_state_dir(env)
        account = data.get("system_account")
        address = account.get("address", "") if isinstance(account, dict) else ""
        host, port = _choose(listener, bool(raw), state_dir,
                             bool(named) or "STATE_DIRECTORY" in env)
        return Target(host, port, str(address or ""))
