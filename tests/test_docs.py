"""docs/configuration.md and the settings model must say the same thing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from relay.settings import (
    AuthSettings,
    OAuthClientSettings,
    PopBeforeSmtpSettings,
    ServerOAuthSettings,
    ServerSettings,
    Settings,
)

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"
_ROW = re.compile(r"^\| `([a-zA-Z_.A-Z]+)` \| (—|`[^|]*`) \| .+ \|$")
# Where a mapping of named sections sits, the docs write NAME.
_NAMED: dict[str, type[BaseModel]] = {"servers.NAME": ServerSettings,
                                       "oauth_clients.NAME": OAuthClientSettings}
_NESTED: dict[str, type[BaseModel]] = {"auth": AuthSettings,
                                       "pop_before_smtp": PopBeforeSmtpSettings,
                                       "oauth": ServerOAuthSettings}


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
