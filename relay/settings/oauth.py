"""[oauth_clients.NAME]: an OAuth client of Google, Microsoft or another provider, and
how the relay proves who it is there.

- `grant = "authorization_code"`: a person signs in once ("Sign in with Google /
  Microsoft"); `client_secret` only for a confidential client.
- `grant = "client_credentials"`: the app itself, no person: `client_secret` (or
  `client_secret_file`), or `client_certificate_file` + `client_key_file` (a PEM
  certificate registered with the provider and its private key: the relay signs an
  RFC 7523 `private_key_jwt` assertion with it, relay.oauth.assertions).
- `grant = "service_account"` (Google): `service_account_file`, the JSON key Google
  issues; the JWT bearer grant with domain-wide delegation to the system address.

Keys and service-account files exist only as files: their paths are kept here, and
they are read when a token is needed (relay.oauth.assertions) and checked, with
their modes, by relay.settings.files. The service account's numeric client ID is
read from its file at validation when `client_id` is not set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator

from relay.settings.credentials import read_private
from relay.settings.values import _read_key, _Section

Grant = Literal["authorization_code", "client_credentials", "service_account"]
SERVICE_ACCOUNT_KEYS = ("client_email", "client_id", "private_key", "token_uri")
"""What the relay needs from a Google service-account JSON key."""
_SIGN_IN = {"google": "Sign in with Google", "microsoft": "Sign in with Microsoft"}


class OAuthClientSettings(_Section):
    provider: Literal["google", "microsoft", "generic"]
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_certificate_file: Path | None = None
    client_key_file: Path | None = None
    service_account_file: Path | None = None
    grant: Grant = "authorization_code"
    tenant: str = "organizations"
    authorize_url: str | None = None
    token_url: str | None = None
    device_url: str | None = None
    revocation_url: str | None = None
    scopes: list[str] | None = None

    @property
    def certificate(self) -> bool:
        """Client authentication by a certificate's key (private_key_jwt)."""
        return self.client_certificate_file is not None

    @property
    def credential(self) -> str:
        """What proves the relay's identity to the provider, in the page's terms."""
        if self.grant == "service_account":
            return (f"Google service account with domain-wide delegation (client ID "
                    f"{self.client_id})")
        if self.grant == "client_credentials":
            how = "client certificate" if self.certificate else "client secret"
            return f"app-only access (no one signs in) with a {how}"
        return f"a person signs in once ({_SIGN_IN.get(self.provider, 'Sign in')})"

    @model_validator(mode="after")
    def _check(self) -> OAuthClientSettings:
        if self.client_secret is not None and self.client_secret_file is not None:
            raise ValueError("set either client_secret or client_secret_file, not both")
        if self.client_secret_file is not None:
            secret = SecretStr(_read_key("client_secret_file", self.client_secret_file))
            object.__setattr__(self, "client_secret", secret)
        if self.provider == "generic" and not (self.authorize_url or self.token_url):
            raise ValueError("a generic provider needs token_url (and authorize_url to sign in)")
        if (self.client_certificate_file is None) != (self.client_key_file is None):
            raise ValueError("client_certificate_file and client_key_file go together: the "
                             "certificate registered with the provider and its private key")
        if self.grant != "service_account" and self.service_account_file is not None:
            raise ValueError('service_account_file needs grant = "service_account"')
        if self.grant == "service_account":
            self._service_account()
        elif self.grant == "client_credentials":
            self._client_credentials()
        elif self.certificate:
            raise ValueError('client_certificate_file needs grant = "client_credentials"')
        if not self.client_id:
            raise ValueError("client_id is required (the provider's ID of the app)")
        return self

    def _client_credentials(self) -> None:
        if self.provider == "google":
            raise ValueError('google does not offer client_credentials: use grant = '
                             '"service_account" (a service account with domain-wide '
                             'delegation) or grant = "authorization_code"')
        if self.certificate and self.client_secret is not None:
            raise ValueError("set either a client secret or client_certificate_file + "
                             "client_key_file, not both")
        if not self.certificate and self.client_secret is None:
            raise ValueError("client_credentials needs client_certificate_file + "
                             "client_key_file, or client_secret_file (or client_secret)")

    def _service_account(self) -> None:
        if self.provider == "microsoft":
            raise ValueError('microsoft has no service accounts: use grant = '
                             '"client_credentials" with client_certificate_file + '
                             'client_key_file')
        if self.service_account_file is None:
            raise ValueError('grant = "service_account" needs service_account_file (the JSON '
                             "key of the service account)")
        if self.client_secret is not None or self.certificate:
            raise ValueError("a service account proves itself with its service_account_file "
                             "only: remove client_secret and client_certificate_file")
        account = service_account_info(self.service_account_file)
        if self.client_id and self.client_id != account["client_id"]:
            raise ValueError(f"client_id = {self.client_id!r}, but service_account_file is "
                             f"the key of client ID {account['client_id']}: remove client_id "
                             "(it is read from the file)")
        object.__setattr__(self, "client_id", account["client_id"])


def service_account_info(path: Path, key: str = "service_account_file") -> dict[str, str]:
    """The fields of a Google service-account JSON key the relay uses (private_key among
    them). ValueError names the key, the file and what is wrong, never a value; the file
    is refused when other users may read it (relay.settings.credentials)."""
    try:
        data = json.loads(read_private(key, path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"{key}: {path} is not a JSON object: download the service "
                         "account's key again (Google Cloud console, IAM, Service accounts, "
                         "Keys, Add key, JSON)")
    missing = [k for k in SERVICE_ACCOUNT_KEYS if not isinstance(data.get(k), str)
               or not data[k]]
    if data.get("type") != "service_account" or missing:
        what = ", ".join(missing) if missing else 'type "service_account"'
        raise ValueError(f"{key}: {path} has no {what}: it is not a service account's JSON "
                         "key (an OAuth client's JSON is not one); create a key for the "
                         "service account, type JSON")
    return {k: str(data[k]) for k in (*SERVICE_ACCOUNT_KEYS, "private_key_id")
            if isinstance(data.get(k), str)}
