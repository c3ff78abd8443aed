"""Where the configuration comes from and how it is read: the file, the admin page's
overrides, `RELAY_` environment variables; one clear line per mistake."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from relay.errors import ConfigError
from relay.settings.disk import durability_warning
from relay.settings.files import file_problems, file_warnings
from relay.settings.model import AdminSettings, Settings
from relay.settings.values import DEFAULT_CONFIG_FILE, default_state_dir, read_secret_file


def config_path(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """--config, else $RELAY_CONFIG, else /etc/sysmail-relay/relay.toml if it exists, else None."""
    if explicit is not None:
        return explicit
    if from_env := env.get("RELAY_CONFIG"):
        return Path(from_env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


OVERRIDES_FILE = "overrides.toml"
"""Written in state_dir by the admin page's Change form; layered over the TOML file."""


def load_settings(path: Path | None, overrides: Path | None = None) -> Settings:
    """Read, merge and validate the configuration. Raises ConfigError.

    The override file (default: `<state_dir>/overrides.toml`, when it exists) is
    layered over the TOML file: see `read_layers`.
    """
    return validate(*read_layers(path, overrides))


def read_layers(path: Path | None, overrides: Path | None = None) -> tuple[dict[str, Any], str]:
    """The TOML file with the override file layered over it, unvalidated, and a description
    of where it came from. Override tables merge key by key, except `[servers.NAME]`,
    which replaces the file's table of that name whole (so that the Change form can
    switch authentication off or put a password in place of a password_file)."""
    data = read_config_file(path)
    source = str(path) if path else "the built-in default"
    overrides = overrides or override_path(data)
    if overrides.exists():
        overlay(data, _read_toml(overrides))
        source += f" with {overrides}"
    return data, source


def read_config_file(path: Path | None) -> dict[str, Any]:
    """One TOML file as it is written (None: the built-in default, empty). ConfigError."""
    return _read_toml(path) if path is not None else {}


def overlay(data: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Layer override data over file data in place (see `read_layers`)."""
    layer = dict(layer)
    servers = layer.pop("servers", None)
    _merge(data, layer)
    if isinstance(servers, Mapping):
        base = data.get("servers")
        data["servers"] = {**(base if isinstance(base, Mapping) else {}), **servers}


def override_path(data: Mapping[str, Any]) -> Path:
    """`<state_dir>/overrides.toml` for this (unvalidated) configuration."""
    state = os.environ.get("RELAY_STATE_DIR") or data.get("state_dir")
    base = Path(state) if isinstance(state, str) else default_state_dir(os.environ)
    return base / OVERRIDES_FILE


def validate(data: Mapping[str, Any], source: str) -> Settings:
    """The settings model over merged data, and every file it names (`file_problems`);
    ConfigError with one line per mistake."""
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()], source) from None
    problems = file_problems(settings)
    if problems:
        raise ConfigError(problems, source)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file; pass --config PATH or set RELAY_CONFIG"]) \
            from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


_SECRET_WORDS = ("password", "secret", "token")


def _describe(err: Mapping[str, Any]) -> str:
    """One line per mistake: key path, the bad value unless it is a secret, what is allowed."""
    loc = [str(part) for part in err["loc"] if not _is_type_tag(part)]
    key = ".".join(loc) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key; check the spelling against docs/configuration.md"
    if kind == "missing":
        return f"{key}: required, but not set"
    secret = any(word in key for word in _SECRET_WORDS)
    if kind == "list_type" and isinstance(err.get("input"), str) and not secret:
        items = ", ".join(f'"{item}"' for item in str(err["input"]).replace(",", " ").split())
        return f"{key}: a list is needed, even for one value: {loc[-1]} = [{items}]"
    value = err.get("input")
    repeated = isinstance(value, str) and repr(value) in msg
    hidden = secret or repeated or isinstance(value, dict | list)
    shown = "" if hidden else f" (got {value!r})"
    return f"{key}: {msg}{shown}"


def _is_type_tag(part: object) -> bool:
    # pydantic puts union member names such as 'IPv4Network' or 'function-after[...]' in locs
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def warnings(settings: Settings) -> list[str]:
    """What is valid but unwise; printed by `check`, logged at start, shown by `status` and
    the page."""
    found: list[str] = []
    for name, server in settings.servers.items():
        if not server.tls_verify:
            found.append(f"servers.{name}.tls_verify = false: the server's certificate is not "
                         "checked, so anyone on the path can read the mail and the password")
        if server.encryption == "none" and server.auth is not None:
            found.append(f"servers.{name}: the password is sent without encryption "
                         "(encryption = \"none\"): choose encryption = \"starttls\" or "
                         "\"tls\"")
        pop = server.pop_before_smtp
        if pop is not None and pop.encryption == "none" and not pop.apop:
            found.append(f"servers.{name}.pop_before_smtp: the POP password is sent without "
                         "encryption (encryption = \"none\", apop = false): choose "
                         "encryption = \"tls\" or \"starttls\", or apop = true")
    durability = durability_warning(settings.state_dir)
    return found + file_warnings(settings) + ([durability] if durability else [])


def admin_token(admin: AdminSettings) -> str | None:
    """The admin token from `admin.token` or `admin.token_file`. Raises ConfigError."""
    if admin.token is not None:
        return admin.token.get_secret_value() or None
    if admin.token_file is not None:
        try:
            return read_secret_file(admin.token_file) or None
        except ValueError as e:
            raise ConfigError([f"admin.token_file: {e}"]) from None
    return None
