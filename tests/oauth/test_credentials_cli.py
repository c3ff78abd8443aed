"""The app's own credentials as an operator meets them, through the installed
`sysmail-relay` with a TOML file: `check` (a client certificate about to expire or not
its key's, private files other users may read; an expired certificate is in
test_expired_certificate.py), `oauth authorize` / `oauth status` / `status` (the
credential, in the page's terms), and `serve`: mail held while Google
refuses the domain-wide delegation, sent once it is allowed; the certificate's expiry
as a metric. The token server is tests/oauth_server.py; the SMTP server takes XOAUTH2
tokens the token server says are active. No real Microsoft or Google endpoint is used.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.oauth.scopes import GOOGLE_MAIL
from tests.oauth_jwt import Certificate, ServiceAccount
from tests.oauth_server import USER, AuthServer
from tests.support import Daemon, free_port, relay_command
from tests.test_no_secrets import OAuthScript
from tests.upstream_servers import Servers

APP_ID = "11111111-2222-3333-4444-555555555555"
CERTIFICATE_KIND = "app-only access (no one signs in) with a client certificate"


@pytest.fixture
def provider() -> Iterator[AuthServer]:
    server = AuthServer().start()
    yield server
    server.close()


class Upstream:
    """An SMTP server taking XOAUTH2 tokens the provider calls active, in its own thread."""

    def __init__(self, provider: AuthServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = Servers()
        self.script = OAuthScript(provider)
        self.script.accept = True
        self.port: int = self.call(self.servers.smtp(self.script, auth_require_tls=False))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.call(self.servers.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def upstream(provider: AuthServer) -> Iterator[Upstream]:
    found = Upstream(provider)
    yield found
    found.close()


def write_config(tmp_path: Path, client: dict[str, str], smtp_port: int = 2,
                 port: int = 2525) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[listener]\nport = {port}\n'
        f'[system_account]\naddress = "{USER}"\nserver = "up"\n'
        '[queue]\nretry_initial = "0.5s"\nretry_max = "1s"\n'
        f'[servers.up]\nhost = "127.0.0.1"\nport = {smtp_port}\nencryption = "none"\n'
        'timeout = 3\n[servers.up.oauth]\nclient = "app"\n'
        "[oauth_clients.app]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in client.items()))
    return config


def certificate_client(tmp_path: Path, provider: AuthServer, cert: Certificate,
                       **files: Any) -> dict[str, str]:
    cert_file, key_file = cert.write(tmp_path / "pki", **files)
    return {"provider": "microsoft", "client_id": APP_ID, "grant": "client_credentials",
            "token_url": f"{provider.url}/token", "client_certificate_file": str(cert_file),
            "client_key_file": str(key_file)}


def service_client(tmp_path: Path, provider: AuthServer, account: ServiceAccount,
                   mode: int = 0o600) -> dict[str, str]:
    path = account.write(tmp_path / "secrets" / "sa.json", f"{provider.url}/token", mode=mode)
    return {"provider": "google", "grant": "service_account", "service_account_file": str(path)}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([relay_command(), *args, "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


# --- check --------------------------------------------------------------------------------


def test_check_warns_thirty_days_before_the_client_certificate_expires(
        tmp_path: Path, provider: AuthServer) -> None:
    soon = write_config(tmp_path, certificate_client(tmp_path, provider, Certificate.make(20)))
    result = cli(soon, "check")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stdout.splitlines() if "expires on" in line)
    assert warning.startswith("warning: oauth_clients.app.client_certificate_file expires on")
    assert "(in 20 days)" in warning and "upload it to the app registration" in warning
    later = write_config(tmp_path, certificate_client(tmp_path, provider, Certificate.make(31)))
    assert "expires on" not in cli(later, "check").stdout


@pytest.mark.parametrize(("case", "expected"), [  # an expired one: test_expired_certificate
    ("another key", r"client_key_file = '.*client\.key' is not the key of "
                    r"oauth_clients\.app\.client_certificate_file"),
    ("key others may read", r"client_key_file = '.*client\.key' may be read by other users "
                            r"\(mode 0640\), so the relay refuses it: chmod 600"),
])
def test_check_refuses_a_client_certificate_it_cannot_use(
        tmp_path: Path, provider: AuthServer, case: str, expected: str) -> None:
    cert = Certificate.make()
    choices: dict[str, dict[str, Any]] = {"another key": {"key": Certificate.make().key},
                                          "key others may read": {"key_mode": 0o640}}
    files = choices.get(case, {})
    config = write_config(tmp_path, certificate_client(tmp_path, provider, cert, **files))
    result = cli(config, "check")
    assert result.returncode == 2 and "configuration OK" not in result.stdout
    assert re.search(f"oauth_clients\\.app\\.{expected}", result.stderr), result.stderr


def test_check_refuses_a_service_account_key_others_may_read(
        tmp_path: Path, provider: AuthServer) -> None:
    config = write_config(tmp_path, service_client(tmp_path, provider, ServiceAccount(), 0o644))
    result = cli(config, "check")
    assert result.returncode == 2
    assert "oauth_clients.app: service_account_file = " in result.stderr
    assert "may be read by other users (mode 0644)" in result.stderr
    assert "BEGIN PRIVATE KEY" not in result.stderr + result.stdout


# --- oauth authorize, oauth status, status --------------------------------------------------


def test_authorize_fetches_an_app_token_and_status_names_the_credential(
        tmp_path: Path, provider: AuthServer) -> None:
    cert = Certificate.make()
    provider.jwt.certificates[APP_ID] = cert.cert
    config = write_config(tmp_path, certificate_client(tmp_path, provider, cert))
    assert "Not granted" in cli(config, "status").stdout
    result = cli(config, "oauth", "authorize")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"app: OAuth authorization Granted (microsoft, {USER})")
    assert provider.client_auth == ["private_key_jwt"]
    assert "https://outlook.office365.com/.default" in cli(config, "oauth", "status").stdout
    shown = cli(config, "status").stdout
    assert re.search(rf"OAuth credential\s+{re.escape(CERTIFICATE_KIND)}", shown), shown
    assert re.search(r"OAuth authorization\s+Granted", shown), shown


# --- serve --------------------------------------------------------------------------------


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        refused = smtp.sendmail("app@apps.example.com", ["boss@example.com"],
                                f"From: app@apps.example.com\r\nSubject: {subject}\r\n\r\n"
                                "body\r\n")
    assert refused == {}


def wait_for(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.1)
    return found


def test_serve_holds_mail_until_the_delegation_is_allowed_then_sends_it(
        tmp_path: Path, provider: AuthServer, upstream: Upstream) -> None:
    account = ServiceAccount()  # the Workspace administrator has not delegated yet
    provider.jwt.service_accounts[account.client_email] = account
    port = free_port()
    config = write_config(tmp_path, service_client(tmp_path, provider, account),
                          upstream.port, port)
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        send(port, "held-for-delegation")

        def held() -> dict[str, Any] | None:
            rows = json.loads(cli(config, "queue", "list", "--json").stdout)
            return next((r for r in rows if "Domain-wide delegation" in json.dumps(r)), None)

        row = wait_for("held", held)
        entry = json.loads(cli(config, "queue", "show", row["id"], "--json").stdout)
        assert entry["place"] == "queue" and entry["attempts"] == 0  # held, not an attempt
        assert f"add client ID {account.client_id} with the scope {GOOGLE_MAIL}" in \
            entry["last_reply"]
        shown = cli(config, "status").stdout
        assert "Not granted" in shown and "Google service account with domain-wide " \
            f"delegation (client ID {account.client_id})" in shown
        assert "Domain-wide delegation" in daemon.log_text()
        account.delegated.add(GOOGLE_MAIL)  # the administrator adds the scope
        result = cli(config, "oauth", "authorize")
        assert result.returncode == 0 and "Granted" in result.stdout, result.stderr
        wait_for("delivered", lambda: len(upstream.script.messages) == 1)
        assert b"held-for-delegation" in upstream.script.messages[0].data
        assert "Granted" in cli(config, "status").stdout
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_metrics_export_when_the_client_certificate_expires(
        tmp_path: Path, provider: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = Certificate.make(days=100)
    admin, port = free_port(), free_port()
    monkeypatch.setenv("RELAY_ADMIN__PORT", str(admin))  # the environment wins
    config = write_config(tmp_path, certificate_client(tmp_path, provider, cert), port=port)
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        def scrape() -> str | None:
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                return None

        text = wait_for("/metrics", scrape)
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    found = re.search(r'^relay_oauth_credential_expiry_timestamp_seconds\{client="app"\} (\S+)$',
                      text, re.M)
    assert found, text
    assert float(found.group(1)) == cert.cert.not_valid_after_utc.timestamp()
