"""The app's own credentials against the tests' authorization server (tests/oauth_server.py,
its checks in tests/oauth_jwt.py): a client certificate (`private_key_jwt`, as Entra ID
takes certificate credentials), a Google service account (JWT bearer grant with
domain-wide delegation) and a client secret (`client_secret_post`).

Each grant obtains a token the server accepts; every way the server refuses one (a
certificate it does not know, a replayed assertion, a deleted service-account key,
missing delegation) makes the authorization Not granted with the cause and the fix,
and the SMTP path holds the mail (not an attempt, not a bounce). Certificates and keys
are real ones made with `cryptography`. The real Microsoft and Google endpoints are
not reached from here.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes

from relay.errors import CredentialError, Held
from relay.metrics import Metrics
from relay.oauth.assertions import CLIENT_ASSERTION_TYPE, client_assertion
from relay.oauth.manager import OAuth
from relay.oauth.scopes import GMAIL_SEND, GOOGLE_MAIL, default_scopes
from relay.settings import Settings
from relay.upstream.smtp import Session
from tests.oauth.test_oauth import xoauth2_server
from tests.oauth_jwt import JWT_BEARER, Certificate, ServiceAccount
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer
from tests.support import settings_for

APP_ID = "11111111-2222-3333-4444-555555555555"
EXCHANGE_APP = "https://outlook.office365.com/.default"


def settings(tmp_path: Path, client: dict[str, Any], port: int = 2) -> Settings:
    return settings_for(
        tmp_path / "state", system_account={"address": USER, "server": "up"},
        servers={"up": {"host": "127.0.0.1", "port": port, "encryption": "none", "timeout": 2,
                        "oauth": {"client": "app"}}},
        oauth_clients={"app": client})


def certificate_client(tmp_path: Path, server: AuthServer, cert: Certificate,
                       **files: Any) -> dict[str, Any]:
    cert_file, key_file = cert.write(tmp_path / "pki", **files)
    return {"provider": "microsoft", "tenant": "contoso.example", "client_id": APP_ID,
            "grant": "client_credentials", "token_url": f"{server.url}/token",
            "client_certificate_file": str(cert_file), "client_key_file": str(key_file)}


def service_client(tmp_path: Path, server: AuthServer, account: ServiceAccount,
                   **key: Any) -> dict[str, Any]:
    path = account.write(tmp_path / "sa.json", f"{server.url}/token", **key)
    return {"provider": "google", "grant": "service_account", "service_account_file": str(path)}


def claims_of(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(text: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return data

    header, claims, _ = assertion.split(".")
    return part(header), part(claims)


# --- a client certificate: private_key_jwt ------------------------------------------------


async def test_client_certificate_obtains_app_tokens_with_signed_assertions(
        tmp_path: Path, provider: AuthServer) -> None:
    cert = Certificate.make()
    provider.jwt.certificates[APP_ID] = cert.cert
    oauth = OAuth(settings(tmp_path, certificate_client(tmp_path, provider, cert)), Metrics())
    assert not oauth.authorization("app").granted
    token = await oauth.access_token("app")
    assert await oauth.fresh_token("app", token) != token
    assert provider.count("client_credentials ok") == 2
    assert provider.client_auth == ["private_key_jwt", "private_key_jwt"]
    auth = oauth.authorization("app")
    assert auth.granted and auth.scopes == [EXCHANGE_APP]
    (h1, c1), (_, c2) = provider.jwt.assertions
    assert h1["x5t#S256"] == cert.thumbprint_sha256() and h1["x5t"] == cert.thumbprint_sha1()
    assert h1["alg"] == "RS256"
    assert c1["iss"] == c1["sub"] == APP_ID and c1["aud"] == f"{provider.url}/token"
    assert 0 < c1["exp"] - c1["iat"] <= 600
    assert c1["jti"] != c2["jti"]


async def test_certificate_the_provider_does_not_know_holds_the_mail_naming_the_fix(
        tmp_path: Path, provider: AuthServer) -> None:
    provider.jwt.certificates[APP_ID] = Certificate.make().cert  # another one was uploaded
    cert = Certificate.make()
    oauth = OAuth(settings(tmp_path, certificate_client(tmp_path, provider, cert)), Metrics())
    with pytest.raises(CredentialError) as refused:
        await oauth.access_token("app")
    text = str(refused.value)
    assert "refused the client certificate of oauth_clients.app" in text
    assert "AADSTS700027" in text  # the provider's own words
    assert cert.cert.fingerprint(hashes.SHA1()).hex().upper() in text  # as Entra ID shows it
    assert "Certificates & secrets" in text and "Mail is held" in text
    auth = oauth.authorization("app")
    assert not auth.granted and auth.reason == text
    # not offered again at once: a held message asking every minute does not hammer it
    with pytest.raises(CredentialError):
        await oauth.access_token("app")
    assert provider.count("client_credentials invalid_client") == 1
    # the certificate is uploaded; after a reload the relay asks at once and gets a token
    provider.jwt.certificates[APP_ID] = cert.cert
    oauth.reconfigure(oauth.settings)
    assert await oauth.access_token("app")
    assert oauth.authorization("app").granted


async def test_replayed_client_assertion_is_refused_by_the_server(
        tmp_path: Path, provider: AuthServer) -> None:
    cert = Certificate.make()
    provider.jwt.certificates[APP_ID] = cert.cert
    cfg = settings(tmp_path, certificate_client(tmp_path, provider, cert)).oauth_clients["app"]
    form = {"grant_type": "client_credentials", "scope": EXCHANGE_APP, "client_id": APP_ID,
            **client_assertion("app", cfg, f"{provider.url}/token")}
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    async with httpx.AsyncClient() as http:
        first = await http.post(f"{provider.url}/token", data=form)
        again = await http.post(f"{provider.url}/token", data=form)
    assert first.status_code == 200 and "access_token" in first.json()
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"
    assert "already used" in again.json()["error_description"]


async def test_private_key_other_users_may_read_is_refused_with_the_chmod(
        tmp_path: Path, provider: AuthServer) -> None:
    cert = Certificate.make()
    provider.jwt.certificates[APP_ID] = cert.cert
    client = certificate_client(tmp_path, provider, cert, key_mode=0o644)
    oauth = OAuth(settings(tmp_path, client), Metrics())
    with pytest.raises(CredentialError, match=r"may be read by other users \(mode 0644\).*"
                                              r"chmod 600"):
        await oauth.access_token("app")
    assert provider.client_auth == []


async def test_refused_certificate_holds_the_mail_on_the_smtp_path(
        tmp_path: Path, provider: AuthServer) -> None:
    """Held, not deferred as an attempt and not bounced, and no sign-in suggested."""
    server, tokens = await xoauth2_server({1})
    async with server:
        port = server.sockets[0].getsockname()[1]
        cert = Certificate.make()
        oauth = OAuth(settings(tmp_path, certificate_client(tmp_path, provider, cert), port),
                      Metrics())
        session = Session("up", oauth.settings.servers["up"], "relay.test", oauth=oauth)
        with pytest.raises(Held) as held:
            await session.open()
        await session.quit()
    assert held.value.stage == "OAuth token" and held.value.retry_at is not None
    assert "Not granted" in held.value.reply and "upload" in held.value.reply
    assert "oauth authorize" not in held.value.reply
    assert tokens == []


# --- a Google service account: the JWT bearer grant ----------------------------------------


async def test_service_account_obtains_a_token_for_the_system_address(
        tmp_path: Path, provider: AuthServer) -> None:
    account = ServiceAccount(delegated={GOOGLE_MAIL})
    provider.jwt.service_accounts[account.client_email] = account
    oauth = OAuth(settings(tmp_path, service_client(tmp_path, provider, account)), Metrics())
    assert oauth.settings.oauth_clients["app"].client_id == account.client_id
    token = await oauth.access_token("app")
    assert provider.count(f"{JWT_BEARER} ok") == 1 and provider.client_auth == []
    ((header, claims),) = provider.jwt.assertions
    assert header["alg"] == "RS256" and header["kid"] == account.private_key_id
    assert claims["iss"] == account.client_email and claims["sub"] == USER
    assert claims["scope"] == GOOGLE_MAIL and claims["aud"] == f"{provider.url}/token"
    assert 0 < claims["exp"] - claims["iat"] <= 3600
    async with httpx.AsyncClient() as http:
        seen = (await http.post(f"{provider.url}/introspect", data={"token": token})).json()
    assert seen["active"] and seen["username"] == USER  # it acts as the system mailbox
    assert oauth.authorization("app").granted


async def test_missing_delegation_says_which_scope_to_allow_for_which_client_id(
        tmp_path: Path, provider: AuthServer) -> None:
    account = ServiceAccount(delegated={"https://www.googleapis.com/auth/calendar"})
    provider.jwt.service_accounts[account.client_email] = account
    oauth = OAuth(settings(tmp_path, service_client(tmp_path, provider, account)), Metrics())
    with pytest.raises(CredentialError) as refused:
        await oauth.access_token("app")
    text = str(refused.value)
    assert "unauthorized_client" in text and "domain-wide delegation is missing" in text
    assert f"add client ID {account.client_id} with the scope {GOOGLE_MAIL}" in text
    assert "Security > Access and data control > API controls > Domain-wide delegation" in text
    assert not oauth.authorization("app").granted


async def test_deleted_service_account_key_is_refused_with_the_fix(
        tmp_path: Path, provider: AuthServer) -> None:
    account = ServiceAccount(delegated={GOOGLE_MAIL})
    provider.jwt.service_accounts[account.client_email] = account
    old = ServiceAccount().key  # a key Google no longer has
    oauth = OAuth(settings(tmp_path, service_client(tmp_path, provider, account, key=old)),
                  Metrics())
    with pytest.raises(CredentialError, match=r"Invalid JWT Signature.*create a new JSON key"):
        await oauth.access_token("app")


async def test_gmail_api_asks_for_gmail_send_and_smtp_for_the_mail_scope() -> None:
    assert default_scopes("google", "service_account") == [GOOGLE_MAIL]
    assert default_scopes("google", "service_account", "gmail_api") == [GMAIL_SEND]
    assert default_scopes("microsoft", "client_credentials") == [EXCHANGE_APP]
    assert default_scopes("microsoft", "client_credentials", "graph") == [
        "https://graph.microsoft.com/.default"]


# --- a client secret: client_secret_post ----------------------------------------------------


async def test_client_secret_goes_in_the_body_for_microsoft(
        tmp_path: Path, provider: AuthServer) -> None:
    client = {"provider": "microsoft", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
              "grant": "client_credentials", "token_url": f"{provider.url}/token"}
    oauth = OAuth(settings(tmp_path, client), Metrics())
    assert await oauth.access_token("app")
    assert provider.client_auth == ["client_secret_post"]
    assert oauth.authorization("app").scopes == [EXCHANGE_APP]


# --- what the configuration refuses -----------------------------------------------------------


@pytest.mark.parametrize(("client", "expected"), [
    ({"provider": "microsoft", "client_id": APP_ID, "grant": "client_credentials",
      "client_certificate_file": "{cert}"}, "client_certificate_file and client_key_file go "
                                            "together"),
    ({"provider": "microsoft", "client_id": APP_ID, "grant": "client_credentials",
      "client_secret": "s", "client_certificate_file": "{cert}", "client_key_file": "{key}"},
     "set either a client secret or client_certificate_file"),
    ({"provider": "microsoft", "client_id": APP_ID, "client_certificate_file": "{cert}",
      "client_key_file": "{key}"}, 'client_certificate_file needs grant = "client_credentials"'),
    ({"provider": "google", "client_id": "x", "grant": "client_credentials",
      "client_secret": "s"}, 'use grant = "service_account"'),
    ({"provider": "microsoft", "grant": "service_account", "service_account_file": "{sa}"},
     'microsoft has no service accounts: use grant = "client_credentials" with '
     "client_certificate_file"),
    ({"provider": "google", "grant": "service_account"}, "needs service_account_file"),
    ({"provider": "google", "grant": "service_account", "service_account_file": "{other}"},
     "has no client_email, client_id, private_key, token_uri: it is not a service "
     "account's JSON key"),
    ({"provider": "google", "grant": "service_account", "service_account_file": "{sa}",
      "client_id": "42"}, "but service_account_file is the key of client ID"),
    ({"provider": "microsoft", "grant": "client_credentials", "client_secret": "s"},
     "client_id is required"),
])
def test_settings_refuse_credentials_that_do_not_go_together(
        tmp_path: Path, client: dict[str, str], expected: str) -> None:
    cert_file, key_file = Certificate.make().write(tmp_path)
    account = ServiceAccount().write(tmp_path / "sa.json", "https://oauth2.googleapis.com/token")
    other = tmp_path / "client.json"  # what "Download JSON" of an OAuth client gives
    other.write_text(json.dumps({"installed": {"client_id": "x.apps.googleusercontent.com",
                                               "client_secret": "s"}}))
    other.chmod(0o600)
    paths = {"{cert}": cert_file, "{key}": key_file, "{sa}": account, "{other}": other}
    filled = {k: str(paths.get(v, v)) for k, v in client.items()}
    with pytest.raises(ValueError, match=re.escape(expected)):
        settings(tmp_path, filled)
