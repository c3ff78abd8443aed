"""The configuration: file lookup, environment, secret files, and one clear line per mistake."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from relay.app import loop_factory
from relay.errors import ConfigError
from relay.settings import (
    DEFAULT_ADDRESS,
    config_path,
    default_state_dir,
    load_settings,
    parse_duration,
)
from tests.support import relay_command


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    return info.value.problems


def test_builtin_default_sends_to_the_local_outbox_as_relay_at_localhost() -> None:
    settings = load_settings(None)
    assert settings.system_account.server == "local"
    assert settings.system_account.address == DEFAULT_ADDRESS
    assert settings.listener.host == "127.0.0.1" and settings.listener.port == 2525
    assert settings.active_server is None
    assert settings.outbox == settings.state_dir / "outbox"


def test_full_design_example_validates(tmp_path: Path) -> None:
    secret = write(tmp_path, "s3cret\n", "smtp_password")
    settings = load_settings(write(tmp_path, f"""
[listener]
host = "127.0.0.1"
port = 2525
allowed_networks = ["127.0.0.0/8", "::1/128", "10.0.0.0/8"]
max_message_size = 26214400
max_recipients = 100
max_connections = 500

[system_account]
active = true
address = "notify@example.com"
server = "system"
from_header = "rewrite"

[servers.system]
host = "smtp.example.com"
port = 587
encryption = "starttls"
timeout = 10
tls_verify = true
rate_limit = "30/min"
max_recipients_per_day = 10000

[servers.system.auth]
method = "CRAM-MD5"
username = "notify"
password_file = "{secret}"

[servers.mail]
host = "mail.example.com"

[servers.mail.pop_before_smtp]
host = "pop.example.com"
encryption = "tls"
apop = true
username = "notify"
password = "pop-pass"
wait = 2
window = 60

[servers.gmail.oauth]
client = "google"

[oauth_clients.google]
provider = "google"
client_id = "1234.apps.googleusercontent.com"
client_secret = "google-secret"

[queue]
max_age = "5d"
retry_initial = "30s"
retry_max = "15m"
notify = "postmaster@example.com"

[admin]
host = "127.0.0.1"
port = 8525
allow_changes = false
"""))
    system = settings.servers["system"]
    assert system.auth is not None and system.auth.secret() == "s3cret"
    assert system.rate_limit is not None and (system.rate_limit.count,
                                              system.rate_limit.seconds) == (30, 60)
    pop = settings.servers["mail"].pop_before_smtp
    assert pop is not None and pop.port == 995 and pop.secret() == "pop-pass"
    gmail = settings.servers["gmail"]
    assert (gmail.host, gmail.port, gmail.encryption) == ("smtp.gmail.com", 465, "tls")
    assert settings.queue.max_age == 5 * 86400 and settings.queue.retry_max == 900


@pytest.mark.parametrize(("encryption", "port"), [("none", 25), ("tls", 465), ("starttls", 587)])
def test_server_port_defaults_by_encryption(tmp_path: Path, encryption: str, port: int) -> None:
    settings = load_settings(write(tmp_path, f"""
[servers.s]
host = "smtp.example.com"
encryption = "{encryption}"
"""))
    assert settings.servers["s"].port == port
    assert settings.servers["s"].timeout == 10


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    assert problems(tmp_path, "[listener]\nprot = 25\n") == [
        "listener.prot: unknown key; check the spelling against docs/configuration.md"]


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, '[listener]\nport = "smtp"\n')
    assert line.startswith("listener.port: ") and "'smtp'" in line


@pytest.mark.parametrize("timeout", [0, 121])
def test_out_of_range_timeout_says_what_is_allowed(tmp_path: Path, timeout: int) -> None:
    (line,) = problems(tmp_path, f'[servers.s]\nhost = "h"\ntimeout = {timeout}\n')
    assert line == f"servers.s.timeout: must be between 1 and 120 seconds (got {timeout})"


def test_pop_wait_is_limited_to_ten_seconds(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, """
[servers.s]
host = "h"
[servers.s.pop_before_smtp]
host = "p"
username = "u"
password = "x"
wait = 11
""")
    assert line == "servers.s.pop_before_smtp.wait: must be between 0 and 10 seconds (got 11)"


def test_missing_address_for_a_real_server_is_refused(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, """
[system_account]
server = "system"
[servers.system]
host = "smtp.example.com"
""")
    assert "system_account.address is required" in line and "servers.system" in line


def test_inactive_account_needs_no_address(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, """
[system_account]
active = false
server = "system"
[servers.system]
host = "smtp.example.com"
"""))
    assert settings.system_account.address is None


def test_auth_and_pop_before_smtp_are_exclusive_and_no_secret_is_shown(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, """
[servers.s]
host = "h"
[servers.s.auth]
method = "PLAIN"
username = "u"
password = "very-secret-password"
[servers.s.pop_before_smtp]
host = "p"
username = "u"
password = "other-secret"
""")
    assert line.startswith("servers.s: auth and pop_before_smtp cannot be combined")
    assert "secret" not in line.replace("(got", "")


def test_bad_secret_value_is_reported_without_the_value(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, """
[servers.s]
host = "h"
[servers.s.auth]
method = "PLAIN"
username = "u"
password = 123456789
""")
    assert line.startswith("servers.s.auth.password: ") and "123456789" not in line


def test_unknown_server_is_named_with_the_choices(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, """
[system_account]
address = "a@example.com"
server = "sytem"
[servers.system]
host = "h"
""")
    assert "'sytem'" in line and "local, system" in line


def test_auth_method_lists_what_is_allowed(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, """
[servers.s]
host = "h"
[servers.s.auth]
method = "NTLM"
username = "u"
password = "p"
""")
    assert line.startswith("servers.s.auth.method: ")
    for method in ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5"):
        assert method in line


def test_several_mistakes_give_one_line_each(tmp_path: Path) -> None:
    lines = problems(tmp_path, """
[listener]
port = 70000
colour = "blue"
[queue]
max_age = "forever"
""")
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"listener.port", "listener.colour",
                                                     "queue.max_age"}


def test_unreadable_password_file_names_the_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, f"""
[servers.s]
host = "h"
[servers.s.auth]
method = "PLAIN"
username = "u"
password_file = "{tmp_path / 'missing'}"
""")
    assert "cannot read secret file" in line and "missing" in line


def test_relative_secret_file_is_found_in_credentials_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smtp_password").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(write(tmp_path, """
[servers.s]
host = "h"
[servers.s.auth]
method = "LOGIN"
username = "u"
password_file = "smtp_password"
"""))
    auth = settings.servers["s"].auth
    assert auth is not None and auth.secret() == "from-systemd"


def test_environment_overrides_the_file_with_nested_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SYSTEM_ACCOUNT__ADDRESS", "env@example.com")
    monkeypatch.setenv("RELAY_SERVERS__SYSTEM__TIMEOUT", "30")
    settings = load_settings(write(tmp_path, """
[system_account]
address = "file@example.com"
server = "system"
[servers.system]
host = "smtp.example.com"
timeout = 20
"""))
    assert settings.system_account.address == "env@example.com"
    assert settings.servers["system"].timeout == 30
    assert settings.servers["system"].host == "smtp.example.com"


def test_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_LISTENER__MAX_RECIPIENTS", "zero")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert info.value.problems[0].startswith("listener.max_recipients: ")


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "[listener\nport = 1\n")
    assert "not valid TOML" in line and "relay.toml" in line


def test_config_file_lookup_order(tmp_path: Path) -> None:
    explicit = tmp_path / "a.toml"
    assert config_path(explicit, {"RELAY_CONFIG": "/x.toml"}) == explicit
    assert config_path(None, {"RELAY_CONFIG": "/x.toml"}) == Path("/x.toml")


def test_state_dir_lookup_order() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/r:/other"}) == Path("/var/lib/r")
    assert default_state_dir({"XDG_STATE_HOME": "/s"}) == Path("/s/sysmail-relay")
    assert default_state_dir({}).parts[-3:] == (".local", "state", "sysmail-relay")


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("5d", 432000),
                                               ("1.5h", 5400), (45, 45)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_check_command_exits_2_with_one_line_per_mistake(tmp_path: Path) -> None:
    path = write(tmp_path, "[listener]\nport = -1\nfoo = 1\n")
    result = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "listener.foo: unknown key" in result.stderr
    assert "listener.port:" in result.stderr


def test_check_refuses_an_admin_page_off_loopback_without_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, '[admin]\nhost = "0.0.0.0"\n')
    result = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "admin.host = '0.0.0.0' is not a loopback address: set admin.token_file" \
        in result.stderr
    token = tmp_path / "admin-token"
    token.write_text("a-long-random-admin-token\n")
    token.chmod(0o600)
    path.write_text(f'[admin]\nhost = "0.0.0.0"\ntoken_file = "{token}"\n')
    result = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "a-long-random-admin-token" not in result.stdout + result.stderr


def test_auth_without_encryption_defaults_to_starttls(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, """
[servers.s]
host = "smtp.example.com"
[servers.s.auth]
method = "PLAIN"
username = "u"
password = "p"
[servers.plain]
host = "smtp.example.com"
"""))
    assert (settings.servers["s"].encryption, settings.servers["s"].port) == ("starttls", 587)
    assert (settings.servers["plain"].encryption, settings.servers["plain"].port) == ("none", 25)


def test_event_loop_lists_the_choices(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, 'event_loop = "trio"\n')
    assert line.startswith("event_loop: ")
    assert "'asyncio'" in line and "'uvloop'" in line


def test_uvloop_asked_for_but_not_installed_is_refused_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an import finds where it is missing
    (line,) = problems(tmp_path, 'event_loop = "uvloop"\n')
    assert "uvloop is not installed" in line and "sysmail-relay[uvloop]" in line
    settings = load_settings(None)  # the default needs nothing more
    assert settings.event_loop == "asyncio"
    assert loop_factory(settings.event_loop) is asyncio.new_event_loop


def test_uvloop_runs_on_uvloop() -> None:
    import uvloop
    assert loop_factory("uvloop") is uvloop.new_event_loop


POP_IN_CLEAR = """state_dir = "{state}"
[system_account]
address = "notify@example.com"
server = "mail"
[servers.mail]
host = "smtp.example.com"
encryption = "starttls"
[servers.mail.pop_before_smtp]
host = "pop.example.com"
username = "notify"
password = "Pop-S3cret"
{more}
"""
POP_WARNING = ("servers.mail.pop_before_smtp: the POP password is sent without encryption "
               "(encryption = \"none\", apop = false)")


@pytest.mark.parametrize("more, warned", [("", True), ("apop = true", False),
                                          ('encryption = "tls"', False)],
                         ids=["USER/PASS in clear", "APOP", "POP3S"])
def test_check_and_status_warn_when_the_pop_password_travels_in_clear(
        tmp_path: Path, more: str, warned: bool) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(POP_IN_CLEAR.format(state=tmp_path / "state", more=more))
    for command in ("check", "status"):
        done = subprocess.run([relay_command(), command, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (POP_WARNING in done.stdout) is warned, done.stdout
        assert "Pop-S3cret" not in done.stdout + done.stderr
        # the SMTP server's own encryption is not what decides it
        assert "servers.mail: the password is sent without encryption" not in done.stdout
