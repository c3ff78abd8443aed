"""The configuration's sections and keys, each validated where it is declared."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import (
    Field,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.settings.oauth import OAuthClientSettings
from relay.settings.values import (
    DEFAULT_ADDRESS,
    LOCAL_SERVER,
    Address,
    Duration,
    Encryption,
    Port,
    RateLimit,
    Timeout,
    Workers,
    _between,
    _loopback,
    _Secret,
    _Section,
    default_state_dir,
)


class ListenerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 2525
    allowed_networks: list[IPv4Network | IPv6Network] = Field(default_factory=_loopback)
    max_message_size: Annotated[int, Field(ge=1024)] = 26_214_400
    max_recipients: Annotated[int, Field(ge=1)] = 100
    max_connections: Annotated[int, Field(ge=1)] = 500
    idle_timeout: Annotated[int, Field(ge=10, le=3600)] = 300
    hostname: str | None = None
    workers: Workers = "auto"  # intake processes (relay.listener.workers)


class SystemAccountSettings(_Section):
    active: bool = True
    address: Address | None = None
    server: str = LOCAL_SERVER
    from_header: Literal["rewrite", "keep"] = "rewrite"


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


class QueueSettings(_Section):
    max_age: Duration = 5 * 86400
    retry_initial: Duration = 30
    retry_max: Duration = 15 * 60
    max_crashes: Annotated[int, Field(ge=1, le=100)] = 5
    notify: Address | None = None

    @model_validator(mode="after")
    def _order(self) -> QueueSettings:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be shorter than retry_initial")
        return self


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8525
    token: SecretStr | None = None
    token_file: Path | None = None
    allow_changes: bool = False


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """The whole configuration (DESIGN.md, "Configuration")."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: Path = Field(default_factory=lambda: default_state_dir(os.environ))
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    """What `serve` runs on: asyncio's own loop, or uvloop (the `uvloop` extra)."""
    listener: ListenerSettings = ListenerSettings()
    system_account: SystemAccountSettings = SystemAccountSettings()
    servers: dict[str, ServerSettings] = Field(default_factory=dict)
    oauth_clients: dict[str, OAuthClientSettings] = Field(default_factory=dict)
    queue: QueueSettings = QueueSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment overrides it.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        account = self.system_account
        if account.address is None and account.server == LOCAL_SERVER:
            object.__setattr__(account, "address", DEFAULT_ADDRESS)
        if account.active and not account.address:
            raise ValueError("system_account.address is required when the account is active "
                             f"and sends through servers.{account.server}")
        if LOCAL_SERVER in self.servers:
            raise ValueError(f"servers.{LOCAL_SERVER} is the built-in outbox; choose another name")
        if account.server != LOCAL_SERVER and account.server not in self.servers:
            known = ", ".join([LOCAL_SERVER, *sorted(self.servers)])
            raise ValueError(f"system_account.server = {account.server!r} names no server; "
                             f"defined: {known}")
        for name, server in self.servers.items():
            if server.oauth is None:
                continue
            client = self.oauth_clients.get(server.oauth.client)
            if client is None:
                raise ValueError(f"servers.{name}.oauth.client = {server.oauth.client!r} names "
                                 "no [oauth_clients] entry")
            provider: tuple[str | None, Encryption] = _PROVIDER_SERVERS.get(
                client.provider, (None, "starttls"))
            host, enc = provider
            if host is None and server.host is None:
                raise ValueError(f"servers.{name}.host is required with a generic OAuth provider")
            server._fill_transport(host, enc)
        if self.admin.token is not None and self.admin.token_file is not None:
            raise ValueError("admin: set either token or token_file, not both")
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError('event_loop = "uvloop", but uvloop is not installed: install it '
                             '(pip install "sysmail-relay[uvloop]") or set event_loop = '
                             '"asyncio"')
        return self

    @property
    def active_server(self) -> ServerSettings | None:
        """The server that sends; None for the built-in outbox."""
        return self.servers.get(self.system_account.server)

    @property
    def outbox(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    def metric_series(self) -> list[ServerSeries]:
        """The servers whose labelled series exist from the first scrape (`Metrics.declare`):
        each configured one and the built-in outbox when it sends."""
        names = {self.system_account.server, *self.servers}
        series = []
        for name in names:
            server = self.servers.get(name)
            if server is None:
                series.append(ServerSeries(name))  # the built-in outbox: no login
            else:
                series.append(ServerSeries(name, server.login_method,
                                           server.pop_before_smtp is not None))
        return series


class ServerSeries(NamedTuple):
    """What decides a server's labelled metric series (`relay.metrics.Metrics.declare`)."""

    name: str
    login: str | None = None
    """The `method` label of its authentication failures; None: it does not log in."""
    pop_before_smtp: bool = False
