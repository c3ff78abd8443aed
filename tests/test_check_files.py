"""Every file the configuration names is checked by `check`, at start and at reload, with
the key, the path and the problem (missing, unreadable, writable by every user, not PEM);
a CA file that disappears later defers mail naming the key and the path, not as an
"internal error" with a bare FileNotFoundError.

The tests run the installed `sysmail-relay` command with a TOML file, as an operator does.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from relay.spool.store import Envelope, Spool
from tests.support import Daemon, free_port, relay_command

SYSTEM_CAS = Path("/etc/ssl/certs/ca-certificates.crt")


def write_config(tmp_path: Path, server: str, extra: str = "", port: int = 2525) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[listener]\nport = {port}\n'
        '[system_account]\naddress = "notify@example.com"\nserver = "up"\n'
        '[queue]\nretry_initial = "1s"\nretry_max = "2s"\n'
        f'{extra}\n[servers.up]\nhost = "127.0.0.1"\nport = {free_port()}\n{server}\n')
    return config


def check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([relay_command(), "check", *args, "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def secret(tmp_path: Path, name: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text("s3cret-value\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("key", "server", "extra"), [
    ("servers.up.ca_file", 'encryption = "starttls"\nca_file = "{missing}"', ""),
    ("servers.up.pop_before_smtp.ca_file",
     '[servers.up.pop_before_smtp]\nhost = "127.0.0.1"\nencryption = "tls"\n'
     'username = "u"\npassword = "p"\nca_file = "{missing}"', ""),
    ("admin.token_file", "", '[admin]\ntoken_file = "{missing}"'),
    ("servers.up.auth: password_file",
     '[servers.up.auth]\nmethod = "PLAIN"\nusername = "u"\npassword_file = "{missing}"', ""),
])
def test_check_refuses_a_missing_file_naming_the_key_and_the_path(
        tmp_path: Path, key: str, server: str, extra: str) -> None:
    missing = tmp_path / "nowhere" / "file.pem"
    config = write_config(tmp_path, server.format(missing=missing),
                          extra.format(missing=missing))
    for args in ((), ("--connect",)):
        result = check(config, *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "configuration OK" not in result.stdout
        problem = next(line for line in result.stderr.splitlines() if key in line)
        assert str(missing) in problem and "no such file" in problem


def test_check_refuses_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a not a certificate")
    result = check(write_config(tmp_path, f'encryption = "tls"\nca_file = "{der}"'))
    assert result.returncode == 2
    assert f"servers.up.ca_file = '{der}': not a PEM CA certificate" in result.stderr


def test_check_accepts_a_pem_ca_file(tmp_path: Path) -> None:
    result = check(write_config(tmp_path, f'encryption = "tls"\nca_file = "{SYSTEM_CAS}"'))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_refuses_a_secret_file_every_user_may_write(tmp_path: Path) -> None:
    path = secret(tmp_path, "password", 0o666)
    result = check(write_config(tmp_path, '[servers.up.auth]\nmethod = "PLAIN"\nusername = "u"\n'
                                f'password_file = "{path}"'))
    assert result.returncode == 2
    assert (f"servers.up.auth.password_file = '{path}': writable by every user (mode 0666)"
            in result.stderr)
    assert f"chmod 600 {path}" in result.stderr and "s3cret-value" not in result.stderr


def test_check_warns_about_a_secret_file_every_user_may_read(tmp_path: Path) -> None:
    path = secret(tmp_path, "token", 0o644)
    result = check(write_config(tmp_path, "", f'[admin]\ntoken_file = "{path}"'))
    assert result.returncode == 0, result.stderr
    assert (f"warning: admin.token_file = '{path}' is readable by every user (mode 0644)"
            in result.stdout)


def test_check_refuses_a_token_store_that_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "tokens").write_text("")
    config = write_config(
        tmp_path, '[servers.up.oauth]\nclient = "c"',
        '[oauth_clients.c]\nprovider = "generic"\nclient_id = "id"\n'
        'token_url = "http://127.0.0.1:1/token"')
    result = check(config)
    assert result.returncode == 2
    assert f"the token store {tmp_path / 'state' / 'tokens'} is not a directory" in result.stderr


def test_serve_refuses_to_start_with_a_missing_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "corp-ca.pem"
    config = write_config(tmp_path, f'encryption = "starttls"\nca_file = "{missing}"',
                          port=free_port())
    result = subprocess.run([relay_command(), "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"servers.up.ca_file = '{missing}': no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_reload_refuses_a_missing_ca_file_and_keeps_the_running_configuration(
        tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, "", port=port)
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        missing = tmp_path / "corp-ca.pem"
        config.write_text(config.read_text() + f'encryption = "tls"\nca_file = "{missing}"\n')
        deadline = time.monotonic() + 20
        while "reload refused" not in daemon.log_text() and time.monotonic() < deadline:
            daemon.send_signal(signal.SIGHUP)  # again, in case it came during start-up
            time.sleep(0.5)
        log = daemon.log_text()
        assert "configuration reload refused" in log, log
        assert f"servers.up.ca_file = '{missing}': no such file" in log
    finally:
        daemon.stop()


def test_ca_file_removed_while_running_defers_mail_naming_the_key_and_path(
        tmp_path: Path) -> None:
    ca = tmp_path / "corp-ca.pem"
    shutil.copyfile(SYSTEM_CAS, ca)
    port = free_port()
    config = write_config(tmp_path, f'encryption = "starttls"\nca_file = "{ca}"', port=port)
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        ca.unlink()
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("app@example.com", ["boss@example.com"],
                            b"Subject: ca\r\n\r\nbody\r\n")
        spool = Spool(tmp_path / "state" / "spool")
        deadline = time.monotonic() + 20
        reply = ""
        while "ca_file" not in reply and time.monotonic() < deadline:
            for _, envelope in spool.scan("queue"):
                if isinstance(envelope, Envelope):
                    reply = envelope.last_reply or ""
            time.sleep(0.05)
        assert f"servers.up.ca_file = '{ca}': no such file" in reply, daemon.log_text()
        assert "internal error" not in reply and "FileNotFoundError" not in daemon.log_text()
    finally:
        daemon.stop()
