"""The sendmail drop-in starts light: cron and applications run it for every message. A
daemon without OAuth does not load the signing and crypto libraries (about 11 MiB)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("aiohttp", "authlib", "httpx", "aiosmtpd", "aiosmtplib", "jinja2",
         "prometheus_client", "relay.app", "relay.admin", "relay.oauth", "relay.upstream",
         "relay.delivery", "cryptography", "joserfc")
SIGNING = ("authlib", "cryptography", "joserfc")


def loaded_after(statement: str) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print('\\n'.join(m for m in sys.modules if m.startswith({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return sorted(set(out.split()))


def test_the_command_line_and_the_sendmail_drop_in_load_no_daemon_http_or_oauth_code() -> None:
    assert loaded_after("from relay import cli; cli.build_parser()") == []
    assert loaded_after("from relay.listener import submit") == []


def test_the_probe_sees_a_heavy_import() -> None:
    assert "relay.app" in loaded_after("from relay import app")


def test_a_daemon_without_oauth_loads_no_signing_or_crypto_code(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    made = ("from pathlib import Path\nfrom relay.settings import load_settings\n"
            "from relay.app import Relay\nimport relay.admin.server\n"
            f"Relay(load_settings(Path({str(config)!r})))")
    assert not [m for m in loaded_after(made) if m.startswith(SIGNING)]
    # the probe sees them where an OAuth client is configured
    config.write_text(config.read_text() + '[system_account]\naddress = "a@example.com"\n'
                      'server = "gmail"\n[servers.gmail]\nhost = "127.0.0.1"\n'
                      'oauth = { client = "google" }\n'
                      '[oauth_clients.google]\nprovider = "google"\nclient_id = "x"\n'
                      'client_secret = "not-used-here"\n')
    assert "authlib" in loaded_after(made)
