"""XOAUTH2 through real Postfix + Dovecot, with the relay run as an operator runs it.

`sysmail-relay serve` with a TOML file sends to the peers' `oauth` listener (STARTTLS,
then AUTH XOAUTH2 only); Dovecot's oauth2 passdb asks the tests' authorization server
(tests/oauth_server.py) whether each token is active, so a token the server no longer
accepts is refused on the wire (334 with a JSON error, then 535), and when the
server is down Postfix answers a plain 535. Each refused login costs Dovecot about
0.5 s, and the listener drops a silent connection after 3 s so that a later message
authenticates again: the tests keep both few.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.metrics import Metrics
from relay.oauth.manager import OAuth
from relay.settings import load_settings
from tests.oauth_jwt import Certificate, ServiceAccount
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer, redirect_query
from tests.peers.peers import MailPeers
from tests.peers.postfix_listeners import OAUTH_IDLE_TIMEOUT
from tests.support import relay_command

from .operator import Relay, assert_relayed, message, start

pytestmark = pytest.mark.integration


@pytest.fixture
def peers(clean_peers: MailPeers) -> Iterator[MailPeers]:
    clean_peers.oauth_server.reset()
    yield clean_peers
    clean_peers.oauth_server.start()  # back up for the next test, whatever happened


def relay_with_oauth(relays: list[Relay], tmp_path: Path, peers: MailPeers,
                     client: dict[str, str | list[str]] | None = None) -> Relay:
    url = peers.oauth_server.url
    client = client or {
        "provider": "generic", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "authorize_url": f"{url}/authorize", "token_url": f"{url}/token",
        "revocation_url": f"{url}/revoke", "scopes": ["smtp", "offline_access"]}
    server = (f'host = "127.0.0.1"\nport = {peers.oauth_port}\nencryption = "starttls"\n'
              f'ca_file = "{peers.ca_file}"\n[servers.up.oauth]\nclient = "test"\n')
    extra = "[oauth_clients.test]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                               for k, v in client.items())
    return start(relays, tmp_path, server, address=USER, extra=extra)


def sign_in(relay: Relay) -> None:
    """What `oauth authorize` does, in this process (the command itself is tested below)."""
    oauth = OAuth(load_settings(relay.config), Metrics())

    async def run() -> None:
        answer = redirect_query(oauth.start_authorization("test", "http://127.0.0.1:9/"))
        await oauth.finish_authorization(answer["state"], answer["code"], None)

    asyncio.run(run())


def stored(relay: Relay) -> dict[str, object]:
    (path,) = (relay.state / "tokens").iterdir()
    data: dict[str, object] = json.loads(path.read_text())
    return data


def sent_and_delivered(relay: Relay, peers: MailPeers, tag: str) -> float:
    relay.send(message(tag))
    assert_relayed(peers, tag, sender=USER)
    assert peers.sasl_method_of(f"<{tag}@apps.example.com>") == "XOAUTH2"
    return time.monotonic()


def test_message_sent_with_xoauth2_reaches_the_maildir(peers: MailPeers, tmp_path: Path,
                                                       relays: list[Relay]) -> None:
    relay = relay_with_oauth(relays, tmp_path, peers)
    sign_in(relay)
    sent_and_delivered(relay, peers, "oauth-first")
    login = peers.sasl_login_of("<oauth-first@apps.example.com>")
    assert login is not None and login.username == USER
    assert peers.oauth_server.introspections == [True]
    shown = relay.cli("status").stdout
    assert "OAuth authorization" in shown and "Granted (generic, notify@example.com)" in shown


def test_token_expiring_between_two_messages_is_refreshed_and_rotated(
        peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    authority: AuthServer = peers.oauth_server
    authority.access_ttl = 4  # the first token: used for one message, then it expires
    relay = relay_with_oauth(relays, tmp_path, peers)
    sign_in(relay)
    first = stored(relay)
    authority.access_ttl = 3600
    sent = sent_and_delivered(relay, peers, "oauth-before-expiry")
    assert authority.count("refresh_token ok") == 0
    expired = float(str(first["expires_at"])) - time.time() + time.monotonic()
    time.sleep(max(0.0, sent + OAUTH_IDLE_TIMEOUT + 0.5 - time.monotonic(),  # new session
                   expired + 0.2 - time.monotonic()))
    sent = sent_and_delivered(relay, peers, "oauth-after-expiry")  # refreshed before AUTH
    second = stored(relay)
    assert authority.count("refresh_token ok") == 1
    assert second["refresh_token"] != first["refresh_token"]  # rotated, and stored
    assert not authority.refresh_token_active(str(first["refresh_token"]))
    # The server stops accepting the access token while the relay still thinks it good:
    # 334 + 535 on the wire, one refresh with the rotated refresh token, AUTH again.
    authority.expire_access_tokens()
    time.sleep(max(0.0, sent + OAUTH_IDLE_TIMEOUT + 0.5 - time.monotonic()))
    sent_and_delivered(relay, peers, "oauth-refused-then-refreshed")
    assert authority.count("refresh_token ok") == 2
    assert authority.count("refresh_token invalid_grant") == 0
    assert authority.introspections.count(False) == 1
    assert stored(relay)["refresh_token"] != second["refresh_token"]


def test_revoked_refresh_token_holds_mail_until_signed_in_again(
        peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = relay_with_oauth(relays, tmp_path, peers)
    sign_in(relay)
    peers.oauth_server.revoke_user()
    queue_id = relay.send(message("oauth-revoked"))
    env = relay.wait_envelope(queue_id, "queue", "Not granted")
    assert "`sysmail-relay oauth authorize test`" in env["last_reply"]
    assert env["attempts"] == 0  # held, not failed, not even counted
    assert "Not granted" in relay.cli("status").stdout
    assert "oauth authorize test" in relay.daemon.log_text()
    # The operator signs in again with the command; the test is the browser.
    proc = subprocess.Popen([relay_command(), "oauth", "authorize", "--no-browser",
                             "--config", str(relay.config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = next(line for line in proc.stdout if line.strip().startswith("http")).strip()
    page = httpx.get(url, follow_redirects=True, timeout=10)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Signed in" in page.text, out + err
    assert "Granted" in out and "1 waiting messages are due now" in out
    assert_relayed(peers, "oauth-revoked", sender=USER)


def test_provider_down_defers_and_the_message_goes_when_it_is_back(
        peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = relay_with_oauth(relays, tmp_path, peers)
    sign_in(relay)
    peers.oauth_server.stop()  # Dovecot cannot check the token: Postfix answers 535
    queue_id = relay.send(message("oauth-provider-down"))
    env = relay.wait_envelope(queue_id, "queue", "cannot reach the token endpoint")
    assert env["attempts"] >= 1 and peers.maildir_messages() == []
    assert "Granted" in relay.cli("status").stdout  # nothing to sign in again for
    peers.oauth_server.start()
    assert_relayed(peers, "oauth-provider-down", sender=USER)


APP_ID = "11111111-2222-3333-4444-555555555555"


def test_app_only_smtp_with_a_client_certificate_sends_as_the_system_address(
        peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    """App-only SMTP as Exchange Online takes it (SMTP.SendAsApp): client credentials
    authenticated by a certificate (private_key_jwt), the scope
    https://outlook.office365.com/.default, AUTH XOAUTH2 with the system address as the
    user; Dovecot's oauth2 passdb accepts the token by introspection, as it carries the
    application permission."""
    cert = Certificate.make()
    peers.oauth_server.jwt.certificates[APP_ID] = cert.cert
    peers.oauth_server.app_permissions[APP_ID] = {"SMTP.SendAsApp"}  # with admin consent
    cert_file, key_file = cert.write(tmp_path / "pki")
    relay = relay_with_oauth(relays, tmp_path, peers, {
        "provider": "microsoft", "tenant": "contoso.example", "client_id": APP_ID,
        "grant": "client_credentials", "token_url": f"{peers.oauth_server.url}/token",
        "client_certificate_file": str(cert_file), "client_key_file": str(key_file)})
    sent_and_delivered(relay, peers, "oauth-app-certificate")  # nobody signed in
    login = peers.sasl_login_of("<oauth-app-certificate@apps.example.com>")
    assert login is not None and login.username == USER
    assert peers.oauth_server.client_auth == ["private_key_jwt"]
    assert peers.oauth_server.count("client_credentials ok") == 1
    assert peers.oauth_server.introspections == [True]
    assert stored(relay)["scopes"] == ["SMTP.SendAsApp"]  # what .default gave


def test_service_account_sends_for_the_system_address_once_delegation_is_allowed(
        peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    """A Google service account (JWT bearer grant, sub = the system address): held while
    the Workspace administrator has not delegated the scope, sent once it is."""
    account = ServiceAccount()
    peers.oauth_server.jwt.service_accounts[account.client_email] = account
    path = account.write(tmp_path / "sa.json", f"{peers.oauth_server.url}/token")
    relay = relay_with_oauth(relays, tmp_path, peers, {
        "provider": "google", "grant": "service_account", "service_account_file": str(path)})
    queue_id = relay.send(message("oauth-service-account"))
    env = relay.wait_envelope(queue_id, "queue", "domain-wide delegation is missing")
    assert env["attempts"] == 0  # held, not an attempt
    assert f"add client ID {account.client_id} with the scope https://mail.google.com/" in \
        env["last_reply"]
    account.delegated.add("https://mail.google.com/")
    result = relay.cli("oauth", "authorize")
    assert result.returncode == 0 and "Granted" in result.stdout, result.stdout + result.stderr
    assert_relayed(peers, "oauth-service-account", sender=USER)
    login = peers.sasl_login_of("<oauth-service-account@apps.example.com>")
    assert login is not None and login.username == USER
