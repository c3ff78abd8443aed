"""`[fleet]`: validated like every section; without it nothing changes and redis is never
loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.settings import file_problems, validate


def fleet_config(tmp_path: Path, **fleet: object) -> dict[str, object]:
    return {"state_dir": str(tmp_path / "state"), "fleet": fleet}


def test_without_fleet_the_daemon_never_loads_redis(tmp_path: Path) -> None:
    code = ("import sys\nfrom relay.app import Relay\nfrom relay.settings import Settings\n"
            f"Relay(Settings(state_dir={str(tmp_path)!r}))\n"
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')"
            " or m.startswith('relay.fleet')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_with_fleet_the_daemon_loads_it(tmp_path: Path) -> None:
    code = ("import sys\nfrom relay.app import Relay\nfrom relay.settings import validate\n"
            f"Relay(validate({{'state_dir': {str(tmp_path)!r}, 'fleet': "
            "{'url': 'redis://127.0.0.1:1/0'}}, 'x'))\n"
            "print('redis' in sys.modules, 'relay.fleet' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True True"


@pytest.mark.parametrize("url", ["redis://redis:6379/0", "rediss://redis:6380/0",
                                 "unix:///run/redis/redis.sock?db=1"])
def test_the_three_kinds_of_url_are_accepted(tmp_path: Path, url: str) -> None:
    settings = validate(fleet_config(tmp_path, url=url), "relay.toml")
    assert settings.fleet is not None and settings.fleet.url == url


def test_another_scheme_is_refused_naming_the_ones_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate(fleet_config(tmp_path, url="http://redis:6379"), "relay.toml")
    assert "fleet: url must start with redis://, rediss:// (TLS) or unix://, not http://" \
        in str(e.value)


def test_a_ca_file_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate(fleet_config(tmp_path, url="redis://redis", ca_file="/etc/ca.pem"),
                 "relay.toml")
    assert "ca_file needs a rediss:// url" in str(e.value)


def test_the_password_comes_from_its_file_and_is_checked_like_other_secrets(
        tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    settings = validate(fleet_config(tmp_path, url="redis://redis", password_file=str(secret)),
                        "relay.toml")
    assert settings.fleet is not None and settings.fleet.password is not None
    assert settings.fleet.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert file_problems(settings) == []
    secret.chmod(0o666)
    assert file_problems(settings) == [
        f"fleet.password_file = {str(secret)!r}: writable by every user (mode 0666), who "
        f"could replace the secret; chmod 600 {secret}"]


def test_the_fleet_comes_from_the_environment_too(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_FLEET__URL", "redis://redis:6379/2")
    settings = validate({"state_dir": str(tmp_path)}, "relay.toml")
    assert settings.fleet is not None and settings.fleet.url == "redis://redis:6379/2"


@pytest.mark.parametrize(("url", "shown_as"), [
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://relay:s3cret@redis:6380/1", "rediss://relay:***@redis:6380/1"),
    ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://redis:6379/0", "redis://redis:6379/0"),
])
def test_a_password_written_into_the_url_is_never_shown(url: str, shown_as: str) -> None:
    from relay.fleet.connect import shown
    assert shown(url) == shown_as


def test_a_token_key_that_is_not_32_bytes_in_hex_is_refused_with_how_to_make_one(
        tmp_path: Path) -> None:
    key = tmp_path / "token_key"
    key.write_text("not-a-key\n")
    with pytest.raises(ConfigError) as e:
        validate(fleet_config(tmp_path, url="redis://redis", token_key_file=str(key)),
                 "relay.toml")
    assert f"must hold 64 hex digits (32 random bytes); make one with `openssl rand -hex 32 " \
           f"> {key}`" in str(e.value)
    key.write_text("0f" * 32 + "\n")
    settings = validate(fleet_config(tmp_path, url="redis://redis", token_key_file=str(key)),
                        "relay.toml")
    assert settings.fleet is not None and settings.fleet.token_key_file == key
