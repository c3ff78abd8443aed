"""The configuration's sections and keys, each validated where it is declared."""

from __future__ import annotations

import importlib.util
import os
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import (
    Field,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.settings.fleet import FleetSettings
from relay.settings.oauth import OAuthClientSettings
from relay.settings.servers import (
    AuthSettings,
    PopBeforeSmtpSettings,
    ServerOAuthSettings,
    ServerSettings,
    check_servers,
)
from relay.settings.values import (
    DEFAULT_ADDRESS,
    LOCAL_SERVER,
    Address,
    Duration,
    Workers,
    _loopback,
    _Section,
    default_state_dir,
)

__all__ = ["AuthSettings", "PopBeforeSmtpSettings", "ServerOAuthSettings", "ServerSettings"]


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
    fleet: FleetSettings | None = None  # several relays, one account (relay.fleet)

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
        check_servers(self.servers, self.oauth_clients)
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
