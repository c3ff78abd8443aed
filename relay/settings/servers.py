"""The `[servers.NAME]` sections: an upstream server, its login and its transport."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from relay.settings.values import (
    Encryption,
    Port,
    RateLimit,
    Timeout,
    _between,
    _Secret,
    _Section,
)


class AuthSettings(_Secret):
    method: Literal["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5"]
    username: str


class PopBeforeSmtpSettings(_Secret):
    host: str
    port: Port | None = None
    encryption: Encryption = "none"
    ca_file: Path | None = None
    apop: bool = False
    username: str
    timeout: Timeout = 10
    wait: Annotated[int, _between(0, 10, " seconds")] = 0
    window: Annotated[int, Field(ge=1, le=86400)] = 60

    @model_validator(mode="after")
    def _default_port(self) -> PopBeforeSmtpSettings:
        if self.port is None:
            object.__setattr__(self, "port", 995 if self.encryption == "tls" else 110)
        return self


class ServerOAuthSettings(_Section):
    client: str
    username: str | None = None


class ServerSettings(_Section):
    host: str | None = None
    port: Port | None = None
    encryption: Encryption | None = None
    timeout: Timeout = 10
    tls_verify: bool = True
    ca_file: Path | None = None
    rate_limit: RateLimit | None = None
    max_recipients_per_day: Annotated[int, Field(ge=1)] | None = None
    pool_size: Annotated[int, Field(ge=1, le=20)] = 2
    auth: AuthSettings | None = None
    pop_before_smtp: PopBeforeSmtpSettings | None = None
    oauth: ServerOAuthSettings | None = None

    @property
    def login_method(self) -> str | None:
        """The `method` label of its authentication failures, None without a login."""
        if self.auth is not None:
            return self.auth.method
        if self.oauth is not None:
            return "XOAUTH2"
        if self.pop_before_smtp is not None:
            return "POP"
        return None

    @model_validator(mode="before")
    @classmethod
    def _one_authentication(cls, data: object) -> object:
        if isinstance(data, Mapping):
            chosen = [k for k in ("auth", "pop_before_smtp", "oauth") if data.get(k) is not None]
            if len(chosen) > 1:
                raise ValueError(f"{' and '.join(chosen)} cannot be combined on one server: "
                                 "choose one way to authenticate")
        return data

    @model_validator(mode="after")
    def _transport(self) -> ServerSettings:
        if self.oauth is None and self.host is None:
            raise ValueError("host is required (the outgoing e-mail server name)")
        if self.oauth is None:
            # A password never goes out unencrypted unless encryption = "none" is written.
            plain: Encryption = "starttls" if self.auth is not None else "none"
            by_port: dict[int, Encryption] = {465: "tls", 587: "starttls"}
            self._fill_transport(self.host, by_port.get(self.port or 25, plain))
        return self

    def _fill_transport(self, host: str | None, encryption: Encryption) -> None:
        enc = self.encryption or encryption
        object.__setattr__(self, "host", self.host or host)
        object.__setattr__(self, "encryption", enc)
        if self.port is None:
            object.__setattr__(self, "port", {"none": 25, "tls": 465, "starttls": 587}[enc])


_PROVIDER_SERVERS: dict[str, tuple[str, Encryption]] = {
    "google": ("smtp.gmail.com", "tls"),
    "microsoft": ("smtp.office365.com", "starttls"),
}
