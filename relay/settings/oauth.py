"""[oauth_clients.NAME]: an OAuth client of Google, Microsoft or another provider."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator

from relay.settings.values import _read_key, _Section


class OAuthClientSettings(_Section):
    provider: Literal["google", "microsoft", "generic"]
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    grant: Literal["authorization_code", "client_credentials"] = "authorization_code"
    tenant: str = "organizations"
    authorize_url: str | None = None
    token_url: str | None = None
    device_url: str | None = None
    revocation_url: str | None = None
    scopes: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> OAuthClientSettings:
        if self.client_secret is not None and self.client_secret_file is not None:
            raise ValueError("set either client_secret or client_secret_file, not both")
        if self.client_secret_file is not None:
            secret = SecretStr(_read_key("client_secret_file", self.client_secret_file))
            object.__setattr__(self, "client_secret", secret)
        if self.provider == "generic" and not (self.authorize_url or self.token_url):
            raise ValueError("a generic provider needs token_url (and authorize_url to sign in)")
        if self.grant == "client_credentials" and self.provider == "google":
            raise ValueError("google does not offer client_credentials for SMTP: use "
                             "grant = \"authorization_code\"")
        if self.grant == "client_credentials" and self.client_secret is None:
            raise ValueError("client_credentials needs client_secret_file (or client_secret)")
        return self
