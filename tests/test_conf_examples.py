"""Every example in conf/ is a valid configuration (secret files are supplied for the test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.settings import load_settings
from tests.oauth_jwt import ServiceAccount

CONF = Path(__file__).parent.parent / "conf"


@pytest.mark.parametrize("example", sorted(CONF.glob("*.toml")), ids=lambda p: p.name)
def test_example_configuration_is_valid(example: Path, tmp_path: Path) -> None:
    text = example.read_text()
    for secret in set(re.findall(r'"(/run/secrets/[^"]+)"', text)):  # stand-ins for the secrets
        stand_in = tmp_path / Path(secret).name
        if stand_in.suffix == ".json":  # a service account's key: a real one, made here
            ServiceAccount().write(stand_in, "https://oauth2.googleapis.com/token")
        else:
            stand_in.write_text("example-secret\n")
            stand_in.chmod(0o600)
        text = text.replace(secret, str(stand_in))
    copy = tmp_path / example.name
    copy.write_text(text)
    settings = load_settings(copy)
    assert settings.system_account.address
    if settings.system_account.server != "local":
        server = settings.active_server
        assert server is not None and (server.host or server.http)
