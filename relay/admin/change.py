"""The "Change system e-mail account" form (only with `admin.allow_changes = true`).

The form's fields are the seed's; what it saves goes to `<state_dir>/overrides.toml`
(mode 0600, written to a temporary file, fsynced and renamed), which
`load_settings` layers over the TOML file: `[system_account]` key by key, and the
edited `[servers.NAME]` table whole. Before anything is written, the file with the
new layer over it is validated by the settings model, so a bad value is refused
with the same line `sysmail-relay check` prints and nothing changes. Then the
relay reloads, as on SIGHUP, keeping its queue. Passwords are write-only: an empty
password field keeps the one in use, and none is ever sent back to the browser.
The stored password is kept only for the same server: a change of host, port or
encryption of the SMTP server (or of the POP server, for its password) is refused
unless the password is typed in again, so that whoever can post the form cannot
point the account at a server of theirs and receive the password.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.admin.page import server_label
from relay.admin.web import ENCRYPTION, RELAY, check_csrf, message, render
from relay.errors import ConfigError
from relay.settings import (
    LOCAL_SERVER,
    OVERRIDES_FILE,
    PopBeforeSmtpSettings,
    ServerSettings,
    Settings,
    overlay,
    read_config_file,
    validate,
)
from relay.spool.state import write_atomically

if TYPE_CHECKING:
    from relay.admin.daemon import Daemon

METHODS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5")
TIMEOUTS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 120)
_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("change_lock")
_HEADER = ("# Written by the sysmail-relay admin page (\"Change system e-mail account\").\n"
           "# Layered over the configuration file: [system_account] key by key, each\n"
           "# [servers.NAME] here replaces the file's table of that name. Delete this file\n"
           "# (and reload) to go back to the configuration file alone.\n")


def setup(app: web.Application) -> None:
    app[_LOCK] = asyncio.Lock()
    app.router.add_get("/change", change_form)
    app.router.add_post("/change", change_save)


# --- the form ------------------------------------------------------------------------------

def edited_server(settings: Settings) -> str:
    """The server whose settings the form shows: the one in use, or `system` for a new one."""
    name = settings.system_account.server
    return "system" if name == LOCAL_SERVER else name


def initial_values(settings: Settings) -> dict[str, str]:
    """The form's fields as the running configuration has them (never a password)."""
    account = settings.system_account
    name = edited_server(settings)
    values = {"active": "true" if account.active else "false",
              "address": account.address or "", "server": account.server,
              "edited_server": name, "auth_method": "", "pop": "", "oauth": ""}
    server = settings.servers.get(name)
    if server is None:
        return values
    values.update(host=server.host or "", port=str(server.port or ""),
                  encryption=server.encryption or "", timeout=str(server.timeout))
    if server.auth is not None:
        values.update(auth_method=server.auth.method, auth_username=server.auth.username)
    if (pop := server.pop_before_smtp) is not None:
        values.update(pop="set", pop_host=pop.host, pop_port=str(pop.port),
                      pop_encryption=pop.encryption, pop_apop="on" if pop.apop else "",
                      pop_username=pop.username, pop_timeout=str(pop.timeout),
                      pop_wait=str(pop.wait))
    if server.oauth is not None:
        values.update(oauth="on", oauth_client=server.oauth.client)
    return values


def form_context(settings: Settings, values: Mapping[str, str],
                 problems: list[str]) -> dict[str, Any]:
    names = sorted({*settings.servers, LOCAL_SERVER, "system"})
    return {"v": {k: v for k, v in values.items() if not k.endswith("password")},
            "servers": [(n, server_label(n, settings)) for n in names],
            "encryptions": ENCRYPTION, "methods": METHODS, "timeouts": TIMEOUTS,
            "oauth_clients": sorted(settings.oauth_clients), "problems": problems,
            "override_file": settings.state_dir / OVERRIDES_FILE}


async def change_form(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    if not relay.settings.admin.allow_changes:
        return _changes_off(request)
    context = form_context(relay.settings, initial_values(relay.settings), [])
    return render(request, "change.html", context)


def _changes_off(request: web.Request) -> web.Response:
    return message(request, "Changes are turned off",
                   "This page only shows the settings. To change them here, set "
                   "admin.allow_changes = true in the configuration file and reload.", 403)


async def change_save(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    form = await request.post()
    check_csrf(request, form)
    if not relay.settings.admin.allow_changes:
        return _changes_off(request)
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    async with request.app[_LOCK]:
        try:
            previous = await asyncio.to_thread(save, relay, values)
        except ConfigError as e:
            context = form_context(relay.settings, values, e.problems)
            return render(request, "change.html", context, 400)
        active = values.get("active", "true") != "false"
        if active != relay.settings.system_account.active:
            relay.activate(active)
        if not relay.reload():
            await asyncio.to_thread(restore, relay.settings, previous)
            return message(request, "Not changed", "The relay refused the new configuration; "
                           "the log says why. The previous settings stay in use.", 500)
    raise web.HTTPSeeOther("/?done=saved")


# --- from the form to the override file -------------------------------------------------

def save(relay: Daemon, form: Mapping[str, str]) -> bytes | None:
    """Validate the form's settings over the file and write the override file.

    Returns the override file's previous content (None: there was none). Raises
    ConfigError with the settings model's lines; then nothing is written.
    """
    path = relay.settings.state_dir / OVERRIDES_FILE
    base = read_config_file(relay.config_file)
    current = read_config_file(path) if path.exists() else {}
    merged = copy.deepcopy(base)
    overlay(merged, copy.deepcopy(current))
    layer = changed_layer(current, merged, form)
    data = copy.deepcopy(base)
    overlay(data, copy.deepcopy(layer))
    new = validate(data, f"{relay.config_file or 'the built-in default'} with the form")
    if new.state_dir != relay.settings.state_dir:
        raise ConfigError([f"state_dir cannot change while running "
                           f"({relay.settings.state_dir} -> {new.state_dir})"])
    name = form.get("edited_server", "").strip()
    if problems := moved_passwords(relay.settings.servers.get(name), new.servers.get(name),
                                   name, form):
        raise ConfigError(problems)
    previous = path.read_bytes() if path.exists() else None
    write_atomically(path, (_HEADER + dump_toml(layer)).encode())
    return previous


def moved_passwords(old: ServerSettings | None, new: ServerSettings | None, name: str,
                    form: Mapping[str, str]) -> list[str]:
    """The stored passwords the form would send to another server than they were for.

    A password kept from the running configuration (its field left empty) may only go
    to the same host, port and encryption; after a change it must be typed in again."""
    if old is None or new is None:
        return []
    problems = []
    kept = " The stored password is kept only for the same host, port and encryption"
    was, now = _endpoint(old), _endpoint(new)
    if old.auth and new.auth and not form.get("auth_password") and was != now:
        problems.append(f"servers.{name}: the server changes ({was} -> {now}): enter the "
                        "password for sending again." + kept)
    pop_old, pop_new = old.pop_before_smtp, new.pop_before_smtp
    if pop_old and pop_new and not form.get("pop_password") \
            and (was := _endpoint(pop_old)) != (now := _endpoint(pop_new)):
        problems.append(f"servers.{name}.pop_before_smtp: the POP server changes ({was} -> "
                        f"{now}): enter the password for receiving again." + kept)
    return problems


def _endpoint(server: ServerSettings | PopBeforeSmtpSettings) -> str:
    return f"{server.host}:{server.port}, encryption {server.encryption}"


def restore(settings: Settings, previous: bytes | None) -> None:
    path = settings.state_dir / OVERRIDES_FILE
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_atomically(path, previous)


def changed_layer(current: Mapping[str, Any], merged: Mapping[str, Any],
                  form: Mapping[str, str]) -> dict[str, Any]:
    """The override layer with the form's values; `merged` is the configuration as written."""
    layer = copy.deepcopy(dict(current))
    account = dict(merged.get("system_account") or {})
    account["active"] = form.get("active", "true") != "false"
    _put(account, "address", form.get("address", ""))
    _put(account, "server", form.get("server", ""))
    layer["system_account"] = account
    name = form.get("edited_server", "").strip()
    servers = merged.get("servers") or {}
    if name and name != LOCAL_SERVER and (name in servers or form.get("host", "").strip()
                                          or form.get("server") == name):
        layer.setdefault("servers", {})[name] = server_table(dict(servers.get(name) or {}),
                                                             form)
    return layer


def server_table(server: dict[str, Any], form: Mapping[str, str]) -> dict[str, Any]:
    server = copy.deepcopy(server)
    for key in ("host", "port", "encryption", "timeout"):
        _put(server, key, form.get(key, ""))
    if form.get("auth_method"):
        auth = _secret_table(server.get("auth"), form, "auth_password")
        auth["method"] = form["auth_method"]
        _put(auth, "username", form.get("auth_username", ""))
        server["auth"] = auth
    else:
        server.pop("auth", None)
    if form.get("pop") == "set":
        pop = _secret_table(server.get("pop_before_smtp"), form, "pop_password")
        for key in ("host", "port", "encryption", "username", "timeout", "wait"):
            _put(pop, key, form.get(f"pop_{key}", ""))
        pop["apop"] = form.get("pop_apop") == "on"
        server["pop_before_smtp"] = pop
    else:
        server.pop("pop_before_smtp", None)
    if form.get("oauth") == "on":
        oauth = dict(server.get("oauth") or {})
        _put(oauth, "client", form.get("oauth_client", ""))
        server["oauth"] = oauth
    else:
        server.pop("oauth", None)
    return server


def _secret_table(old: object, form: Mapping[str, str], field: str) -> dict[str, Any]:
    """The table with its password: the new one typed in, else the one configured."""
    table = dict(old) if isinstance(old, Mapping) else {}
    if form.get(field):
        table.pop("password_file", None)
        table["password"] = form[field]
    return table


def _put(table: dict[str, Any], key: str, raw: str) -> None:
    """Set a key from a form field: digits become a number, empty removes the key."""
    value = raw.strip()
    if not value:
        table.pop(key, None)
    else:
        table[key] = int(value) if value.isdigit() else value


# --- the override file ---------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for nested tables of strings, numbers, booleans and lists of those."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{prefix}.{_key(key)}" if prefix else _key(key)
            if any(not isinstance(v, Mapping) for v in value.values()) or not value:
                out += f"\n[{name}]\n"
            out += dump_toml(value, name)
    return out


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):  # JSON's escapes are TOML's, but for DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to the override file")
