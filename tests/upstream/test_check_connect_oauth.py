"""`sysmail-relay check --connect` with OAuth: the token step fails with one line that
says what is wrong and what to run or change, before any connection is made."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import free_port, relay_command


def check_connect(tmp_path: Path, client: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[system_account]\n'
        'address = "notify@example.com"\nserver = "up"\n'
        f'[servers.up]\nhost = "127.0.0.1"\nport = {free_port()}\nencryption = "none"\n'
        '[servers.up.oauth]\nclient = "corp"\n'
        '[oauth_clients.corp]\nprovider = "generic"\nclient_id = "relay"\n'
        f'token_url = "http://127.0.0.1:{free_port()}/token"\n{client}')
    result = subprocess.run([relay_command(), "check", "--connect", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_not_granted_says_how_to_sign_in(tmp_path: Path) -> None:
    result = check_connect(tmp_path, 'authorize_url = "http://127.0.0.1:1/authorize"\n')
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert line.startswith("OAuth token") and "Not granted" in line
    assert "sysmail-relay oauth authorize corp" in line


def test_provider_unreachable_names_the_client_keys(tmp_path: Path) -> None:
    result = check_connect(tmp_path, 'grant = "client_credentials"\n'
                                     'client_secret = "the-client-secret"\n')
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert line.startswith("OAuth token") and "oauth_clients.corp" in line
    assert "the-client-secret" not in result.stdout + result.stderr
