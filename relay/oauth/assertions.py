"""Signed JWT assertions (RFC 7523): what the relay sends to a token endpoint in place of a
secret, and what a refusal of one means.

- `client_assertion()`: `private_key_jwt` client authentication (RFC 7523 section 2.2)
  with a client certificate's key, as Entra ID takes certificate credentials: header
  `x5t#S256` and `x5t` (the certificate's SHA-256 and SHA-1 thumbprints, base64url),
  claims iss = sub = client_id, aud = the token URL, a unique jti, exp
  CLIENT_ASSERTION_SECONDS after iat (Entra ID accepts at most 10 minutes).
- `bearer_grant()`: the JWT bearer authorization grant (RFC 7523 section 2.1) of a Google
  service account: iss = its client_email, sub = the mailbox it acts for (domain-wide
  delegation), scope, aud = its token_uri, exp one hour after iat (Google's maximum).
- `refusal()`: the provider refused such a credential: the cause and the fix, in words.
- `export_credential_expiry()`: when each client certificate expires, for the metric.

authlib signs (authlib.oauth2.rfc7523, with a joserfc key; both imported by the first
assertion, so a relay without one does not load them). The key files are read for
every assertion (relay.settings.credentials: a key other users may read is refused), so
a renewed certificate is used without a reload. A problem with them, an expired
certificate included (nothing is sent: the provider would refuse it), is
CredentialError (mail is held). No key material ever leaves this module but inside a
signed assertion.
"""

from __future__ import annotations

import contextlib
from base64 import urlsafe_b64encode

from relay.errors import CredentialError, ProviderRefused
from relay.metrics import Metrics
from relay.settings import OAuthClientSettings, Settings
from relay.settings.credentials import (
    ClientCertificate,
    client_certificate,
    expired,
    read_certificate,
)
from relay.settings.oauth import service_account_info

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_SECONDS = 300
BEARER_ASSERTION_SECONDS = 3600
REFUSED = frozenset({"invalid_client", "unauthorized_client", "invalid_grant", "access_denied",
                     "invalid_scope"})
"""A token endpoint's errors that refuse the app's credential (held, not retried soon)."""
DELEGATION = ("Google Admin console, Security > Access and data control > API controls > "
              "Domain-wide delegation")


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def certificate(name: str, cfg: OAuthClientSettings) -> ClientCertificate:
    """The client certificate and key of oauth_clients.NAME, checked to belong together
    (expired or not). CredentialError."""
    if cfg.client_certificate_file is None or cfg.client_key_file is None:
        raise CredentialError(f"oauth_clients.{name} has no client_certificate_file")
    try:
        return client_certificate(f"oauth_clients.{name}", cfg.client_certificate_file,
                                  cfg.client_key_file)
    except ValueError as e:
        raise CredentialError(f"{e}. Mail is held until it is fixed") from None


def client_assertion(name: str, cfg: OAuthClientSettings, token_url: str) -> dict[str, str]:
    """The `client_assertion` parameters (private_key_jwt) for one token request."""
    from authlib.oauth2.rfc7523 import private_key_jwt_sign  # type: ignore[import-untyped]
    from cryptography.hazmat.primitives import hashes
    from joserfc.jwk import ECKey, RSAKey
    found = certificate(name, cfg)
    if reason := expired(found):
        raise CredentialError(f"oauth_clients.{name}: {reason}. Mail is held until then")
    key = (RSAKey if found.algorithm == "RS256" else ECKey).import_key(found.key_pem())
    header = {"typ": "JWT", "x5t#S256": _b64(found.thumbprint(hashes.SHA256())),
              "x5t": _b64(found.thumbprint(hashes.SHA1()))}  # Entra ID wants x5t too
    assertion: str = private_key_jwt_sign(key, cfg.client_id, token_url, alg=found.algorithm,
                                          header=header, expires_in=CLIENT_ASSERTION_SECONDS)
    return {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}


def bearer_grant(name: str, cfg: OAuthClientSettings, subject: str,
                 scope: str) -> tuple[str, dict[str, str]]:
    """The token URL and the parameters of a service account's JWT bearer grant for the
    mailbox `subject`."""
    from authlib.oauth2.rfc7523.assertion import (  # type: ignore[import-untyped]
        sign_jwt_bearer_assertion,
    )
    from joserfc.errors import JoseError
    from joserfc.jwk import RSAKey
    assert cfg.service_account_file is not None
    key_name = f"oauth_clients.{name}.service_account_file"
    try:
        info = service_account_info(cfg.service_account_file, key_name)
        key = RSAKey.import_key(info["private_key"])
    except ValueError as e:
        raise CredentialError(f"{e}. Mail is held until it is fixed") from None
    except (JoseError, TypeError):
        raise CredentialError(f"{key_name}: its private_key is not an RSA private key in PEM: "
                              "create a new JSON key for the service account. Mail is held "
                              "until it is fixed") from None
    token_url = cfg.token_url or info["token_uri"]
    header = {"typ": "JWT", **({"kid": info["private_key_id"]}
                               if "private_key_id" in info else {})}
    assertion: str = sign_jwt_bearer_assertion(
        key, info["client_email"], token_url, subject=subject, claims={"scope": scope},
        header=header, alg="RS256", expires_in=BEARER_ASSERTION_SECONDS)
    return token_url, {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}


def export_credential_expiry(settings: Settings, metrics: Metrics) -> None:
    """relay_oauth_credential_expiry_timestamp_seconds{client} for every client with a
    certificate: when it expires; 0 when it cannot be read (`check` says why)."""
    for name, cfg in settings.oauth_clients.items():
        if cfg.client_certificate_file is None:
            continue
        try:
            cert = read_certificate(name, cfg.client_certificate_file)
            expiry = cert.not_valid_after_utc.timestamp()
        except ValueError:
            expiry = 0.0
        metrics.oauth_credential_expiry.labels(name).set(expiry)


def refusal(name: str, cfg: OAuthClientSettings, account: str, scope: str,
            e: ProviderRefused) -> str:
    """Why the provider refused the app's credential, and what to change where."""
    why = f"{e.error}: {e.description}" if e.description else e.error
    held = "Mail is held; the relay asks again every minute, and at once after a reload"
    if cfg.grant == "service_account":
        if e.error == "unauthorized_client":
            return (f"Google refused to let the service account of oauth_clients.{name} act "
                    f"for {account} ({why}): domain-wide delegation is missing. In the "
                    f"{DELEGATION}, add client ID {cfg.client_id} with the scope {scope} "
                    f"(or add that scope to its entry). {held}")
        return (f"Google refused the service account's assertion for {account} ({why}): its "
                f"key in oauth_clients.{name}.service_account_file may have been deleted or "
                f"disabled (create a new JSON key), {account} may not be a user of the "
                f"Workspace domain, or this machine's clock is wrong. {held}")
    if e.error == "invalid_client" and cfg.certificate:
        thumbprint = "?"
        with contextlib.suppress(CredentialError):
            thumbprint = certificate(name, cfg).shown_thumbprint
        return (f"the token endpoint refused the client certificate of oauth_clients.{name} "
                f"({why}): upload oauth_clients.{name}.client_certificate_file (SHA-1 "
                f"thumbprint {thumbprint}) to the app registration (Entra ID: Certificates & "
                "secrets > Certificates), and check client_id and tenant. " + held)
    if e.error == "invalid_client":
        return (f"the token endpoint refused the client secret of oauth_clients.{name} "
                f"({why}): it may have expired or been replaced (Entra ID: Certificates & "
                f"secrets): put the current one in client_secret_file, and check client_id "
                f"and tenant. {held}")
    return (f"the token endpoint refused app-only access for oauth_clients.{name} ({why}): "
            f"grant the app the application permission for {scope} (Exchange Online "
            "SMTP.SendAsApp for SMTP, Microsoft Graph Mail.Send for Graph) with admin "
            f"consent. {held}")
