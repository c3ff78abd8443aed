"""docs/configuration.md and the settings model must say the same thing."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from relay.settings import (
    AuthSettings,
    FleetSettings,
    OAuthClientSettings,
    PopBeforeSmtpSettings,
    ServerOAuthSettings,
    ServerSettings,
    Settings,
)
from tests.support import relay_command

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"
_ROW = re.compile(r"^\| `([a-zA-Z_.A-Z]+)` \| (—|`[^|]*`) \| .+ \|$")
# Where a mapping of named sections sits, the docs write NAME.
_NAMED: dict[str, type[BaseModel]] = {"servers.NAME": ServerSettings,
                                       "oauth_clients.NAME": OAuthClientSettings}
_NESTED: dict[str, type[BaseModel]] = {"auth": AuthSettings,
                                       "pop_before_smtp": PopBeforeSmtpSettings,
                                       "oauth": ServerOAuthSettings}
# Optional sections (absent by default) whose keys the docs list one by one.
_OPTIONAL: dict[str, type[BaseModel]] = {"fleet": FleetSettings}


def documented() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        if m := _ROW.match(line):
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = m.group(2)
    return rows


def model_fields() -> dict[str, FieldInfo]:
    fields: dict[str, FieldInfo] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            if f"{path}.NAME" in _NAMED:
                walk(f"{path}.NAME.", _NAMED[f"{path}.NAME"])
            elif prefix and name in _NESTED:
                walk(path + ".", _NESTED[name])
            elif not prefix and name in _OPTIONAL:
                walk(path + ".", _OPTIONAL[name])
            elif isinstance(info.default, BaseModel):
                walk(path + ".", type(info.default))
            else:
                fields[path] = info

    walk("", Settings)
    return fields


def test_every_setting_is_documented_and_every_documented_key_exists() -> None:
    docs, model = set(documented()), set(model_fields())
    assert model - docs == set(), "settings missing from docs/configuration.md"
    assert docs - model == set(), "docs/configuration.md lists keys the model does not have"


@pytest.mark.parametrize("key", sorted(documented()))
def test_documented_default_is_the_real_default(key: str) -> None:
    info = model_fields()[key]
    text = documented()[key]
    if key == "state_dir":  # computed from the environment, described in words
        assert text == "—"
        return
    real: Any = None if info.is_required() else info.get_default(call_default_factory=True)
    if text == "—":
        assert real is None, f"{key}: docs say no default, the model has {real!r}"
        return
    value = tomllib.loads(f"v = {text.strip('`')}")["v"]
    parsed = TypeAdapter(info.rebuild_annotation()).validate_python(value)
    assert parsed == real, f"{key}: docs say {text}, the model has {real!r}"


def _rows() -> dict[str, str]:
    return {m.group(1): line for line in DOC.read_text().splitlines() if (m := _ROW.match(line))}


@pytest.mark.parametrize("key", sorted(k for k, info in model_fields().items()
                                       if "list[" in str(info.rebuild_annotation())))
def test_a_list_setting_is_documented_with_a_list_that_validates(key: str) -> None:
    """A reader writes what the row shows: a TOML list (`scopes = ["..."]`), not a string."""
    row = _rows()[key]
    name = key.rsplit(".", 1)[-1]
    shown = re.findall(rf"`(?:{name} = )?(\[[^`]*\])`", row)
    assert shown, f"{key}: docs/configuration.md shows no list for it"
    annotation = model_fields()[key].rebuild_annotation()
    for text in shown:
        TypeAdapter(annotation).validate_python(tomllib.loads(f"v = {text}")["v"])


def test_a_string_where_a_list_is_needed_is_refused_with_the_list_to_write(
        tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[oauth_clients.corp]\nprovider = "generic"\n'
                      'client_id = "relay"\ntoken_url = "https://idp.example.com/token"\n'
                      'scopes = "https://mail.google.com/ offline_access"\n')
    done = subprocess.run([relay_command(), "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ('oauth_clients.corp.scopes: a list is needed, even for one value: '
            'scopes = ["https://mail.google.com/", "offline_access"]') in done.stderr
