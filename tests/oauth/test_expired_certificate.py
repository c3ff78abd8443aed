"""A client certificate that has expired, or expires while the relay runs, does not stop
intake: the relay accepts mail (every 250 is on disk) and holds it, as for a revoked
grant, with the authorization "Not granted" and the reason (the thumbprint, the date,
where to upload a new one); the file is read for every token, so once it is renewed the
next token request succeeds and the held mail goes. `check` still reports it as an error.
A key that is not the certificate's stays a configuration error, at start and at reload.
A refused app credential is logged once, as an error (not again by the keep-alive).

Against tests/oauth_server.py (which checks the signed assertions) and an SMTP server
taking the XOAUTH2 tokens it issued; `serve`, `check` and `status` are the installed
`sysmail-relay`.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from relay.errors import CredentialError
from relay.metrics import Metrics
from relay.oauth.manager import OAuth
from tests.oauth.test_credentials import APP_ID, certificate_client, settings
from tests.oauth.test_credentials_cli import Upstream, cli, send, wait_for, write_config
from tests.oauth.test_credentials_cli import certificate_client as cli_certificate_client
from tests.oauth_jwt import Certificate
from tests.oauth_server import AuthServer
from tests.support import Daemon, free_port

HELD_FOR = "expired on {date}: upload a new one in Certificates & secrets and write it to " \
           "client_certificate_file"


def expired_certificate() -> Certificate:
    return Certificate.make(days=-1, valid_since_days=30)


def reason_for(cert: Certificate) -> str:
    """What the relay says about an expired certificate, as the operator reads it."""
    thumbprint = cert.cert.fingerprint(hashes.SHA1()).hex().upper()  # as Entra ID shows it
    date = f"{cert.cert.not_valid_after_utc:%Y-%m-%d}"
    return f"the client certificate {thumbprint} " + HELD_FOR.format(date=date)


@pytest.fixture
def provider() -> Iterator[AuthServer]:
    server = AuthServer().start()
    yield server
    server.close()


async def test_expired_certificate_is_not_granted_until_the_file_is_renewed(
        tmp_path: Path, provider: AuthServer) -> None:
    old, new = expired_certificate(), Certificate.make()
    provider.jwt.certificates[APP_ID] = new.cert  # the new one is uploaded
    oauth = OAuth(settings(tmp_path, certificate_client(tmp_path, provider, old)), Metrics())
    with pytest.raises(CredentialError) as refused:
        await oauth.access_token("app")
    assert reason_for(old) in str(refused.value) and "Mail is held" in str(refused.value)
    assert provider.client_auth == []  # nothing was sent
    auth = oauth.authorization("app")
    assert not auth.granted and auth.reason is not None and reason_for(old) in auth.reason
    new.write(tmp_path / "pki")  # renewed in place: no reload
    assert await oauth.access_token("app")
    assert oauth.authorization("app").granted
    assert provider.client_auth == ["private_key_jwt"]


async def test_keep_alive_logs_the_first_refusal_of_an_app_credential_once(
        tmp_path: Path, provider: AuthServer, caplog: pytest.LogCaptureFixture) -> None:
    provider.jwt.certificates[APP_ID] = Certificate.make().cert  # another one was uploaded
    cert = Certificate.make()
    oauth = OAuth(settings(tmp_path, certificate_client(tmp_path, provider, cert)), Metrics())
    with caplog.at_level(logging.INFO, logger="relay.oauth"):
        await oauth.keep_alive()
    refused = [r for r in caplog.records if "refused the client certificate" in r.getMessage()]
    assert [r.levelname for r in refused] == ["ERROR"], caplog.text
    caplog.clear()
    oauth.reconfigure(oauth.settings)  # asked again: known already, so a warning only
    with caplog.at_level(logging.INFO, logger="relay.oauth"):
        await oauth.keep_alive()
    refused = [r for r in caplog.records if "refused the client certificate" in r.getMessage()]
    assert [r.levelname for r in refused] == ["WARNING"], caplog.text
    assert provider.count("client_credentials invalid_client") == 2


def test_check_reports_an_expired_certificate_as_an_error(
        tmp_path: Path, provider: AuthServer) -> None:
    cert = expired_certificate()
    config = write_config(tmp_path, cli_certificate_client(tmp_path, provider, cert))
    result = cli(config, "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "configuration OK" not in result.stdout
    assert result.stdout.startswith("configuration valid, but mail is held")
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert re.match(r"error: oauth_clients\.app\.client_certificate_file = '.*client\.crt': ",
                    error), error
    assert reason_for(cert) in error and "until then the relay holds the mail" in error


def test_serve_with_an_expired_certificate_accepts_and_holds_mail_until_it_is_renewed(
        tmp_path: Path, provider: AuthServer) -> None:
    old, new = expired_certificate(), Certificate.make()
    provider.jwt.certificates[APP_ID] = new.cert  # uploaded; the file is not yet replaced
    upstream = Upstream(provider)
    port = free_port()
    config = write_config(tmp_path, cli_certificate_client(tmp_path, provider, old),
                          upstream.port, port)
    daemon = Daemon(config, tmp_path / "relay.log", port)
    try:
        daemon.start()  # the old code refused to start here
        send(port, "held-for-the-certificate")  # 250
        send(port, "held-as-well")

        def held() -> dict[str, object] | None:
            rows = json.loads(cli(config, "queue", "list", "--json").stdout)
            return next((r for r in rows if reason_for(old) in json.dumps(r)), None)

        row = wait_for("held", held)
        entry = json.loads(cli(config, "queue", "show", str(row["id"]), "--json").stdout)
        assert entry["place"] == "queue" and entry["attempts"] == 0  # held, not an attempt
        shown = cli(config, "status").stdout
        assert re.search(r"OAuth authorization\s+Not granted", shown), shown
        assert reason_for(old) in shown, shown
        assert "up: not granted" in shown and re.search(r"\bheld 2\b", shown), shown
        assert provider.client_auth == [] and upstream.script.messages == []
        new.write(tmp_path / "pki")  # renewed in place; nobody runs anything
        wait_for("delivered", lambda: len(upstream.script.messages) == 2, timeout=120)
        for subject in (b"held-for-the-certificate", b"held-as-well"):
            assert any(subject in m.data for m in upstream.script.messages), subject
        # the first token made the rest of the held mail due at once, not at its next retry
        assert "OAuth authorization granted: " in daemon.log_text()
        assert provider.client_auth == ["private_key_jwt"]
        assert re.search(r"OAuth authorization\s+Granted", cli(config, "status").stdout)
        said = [line.split(" ")[1] for line in daemon.log_text().splitlines()
                if reason_for(old) in line and " relay.oauth: " in line]
        assert said == ["error"], said  # once, however often a token was asked for

        expired_certificate().write(tmp_path / "pki")  # expires while the relay runs
        daemon.send_signal(signal.SIGHUP)
        wait_for("reloaded", lambda: "configuration reloaded" in daemon.log_text())
        assert "reload refused" not in daemon.log_text()
        new.write(tmp_path / "pki", key=Certificate.make().key)  # not its key: refused
        daemon.send_signal(signal.SIGHUP)
        wait_for("reload refused", lambda: "configuration reload refused" in daemon.log_text())
        assert "is not the key of oauth_clients.app.client_certificate_file" in \
            daemon.log_text()
    finally:
        code = daemon.stop() if daemon.proc is not None else 0
        upstream.close()
    assert code == 0, daemon.log_text()
