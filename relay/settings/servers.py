"""The `[servers.NAME]` sections: an upstream server, its login and its transport.

`protocol` chooses how a server is spoken to: "smtp" (the default: host, port,
encryption and one of auth, pop_before_smtp or oauth), "graph" (Microsoft Graph
`sendMail` at `graph_url`) or "gmail_api" (the Gmail API's `messages.send` at
`gmail_url`). An HTTP server needs [servers.NAME.oauth] and refuses the keys that
only SMTP has. `check_servers` does what needs the whole configuration: the OAuth
client each server names, the provider's SMTP host, one client per API and
`fallback_server`. (The scopes a client asks for by default, by protocol, are
relay.oauth.scopes'.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, Protocol

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


Protocol_ = Literal["smtp", "graph", "gmail_api"]
HTTP_PROTOCOLS = ("graph", "gmail_api")
GRAPH_URL = "https://graph.microsoft.com"
GMAIL_URL = "https://gmail.googleapis.com"
_SMTP_ONLY = ("host", "port", "encryption", "auth", "pop_before_smtp")
_PRESETS: dict[str, dict[str, object]] = {
    # the providers' documented per-mailbox limits (docs/http-apis.md)
    "graph": {"rate_limit": RateLimit(count=30, seconds=60), "max_recipients_per_day": 10_000},
    "gmail_api": {"max_recipients_per_day": 2_000},
}
class ServerSettings(_Section):
    protocol: Protocol_ = "smtp"
    graph_url: str = GRAPH_URL
    gmail_url: str = GMAIL_URL
    fallback_server: str | None = None
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
            return "Bearer" if self.http else "XOAUTH2"
        if self.pop_before_smtp is not None:
            return "POP"
        return None

    @property
    def http(self) -> bool:
        """Spoken to over HTTPS (Graph, the Gmail API), not SMTP."""
        return self.protocol in HTTP_PROTOCOLS

    @property
    def api_url(self) -> str:
        """The base URL of an HTTP server's API, without a trailing slash."""
        return (self.graph_url if self.protocol == "graph" else self.gmail_url).rstrip("/")

    @property
    def protocol_label(self) -> str:
        """The protocol for people (`status`, the admin page)."""
        return {"smtp": "SMTP", "graph": "Microsoft Graph (sendMail)",
                "gmail_api": "Gmail API (messages.send)"}[self.protocol]

    @property
    def endpoint(self) -> str:
        """Where the server is, for people: host:port, or the API's URL."""
        return self.api_url if self.http else f"{self.host}:{self.port}"

    @model_validator(mode="before")
    @classmethod
    def _one_authentication(cls, data: object) -> object:
        if isinstance(data, Mapping) and data.get("protocol") in HTTP_PROTOCOLS:
            protocol = data["protocol"]
            smtp_only = [k for k in _SMTP_ONLY if data.get(k) is not None]
            if smtp_only:
                raise ValueError(
                    f"{', '.join(smtp_only)}: only for protocol = \"smtp\"; a {protocol} "
                    f"server is reached at {'graph_url' if protocol == 'graph' else 'gmail_url'}"
                    " with a bearer token from [servers.NAME.oauth]: remove them")
            if data.get("oauth") is None:
                raise ValueError(
                    f"protocol = \"{protocol}\" needs [servers.NAME.oauth] with client = "
                    "an [oauth_clients] entry: the API takes a bearer token, not a password "
                    "(docs/http-apis.md)")
        if isinstance(data, Mapping):
            other = {"graph_url": "graph", "gmail_url": "gmail_api"}
            for key, protocol in other.items():
                if data.get(key) is not None and data.get("protocol", "smtp") != protocol:
                    raise ValueError(f"{key} is only for protocol = \"{protocol}\"; this "
                                     f"server's protocol is \"{data.get('protocol', 'smtp')}\"")
            for key in ("graph_url", "gmail_url"):
                url = data.get(key)
                if url is not None and not (isinstance(url, str)
                                            and url.startswith(("https://", "http://"))):
                    raise ValueError(f"{key} must be an https:// URL such as "
                                     f"{GRAPH_URL if key == 'graph_url' else GMAIL_URL}")
            chosen = [k for k in ("auth", "pop_before_smtp", "oauth") if data.get(k) is not None]
            if len(chosen) > 1:
                raise ValueError(f"{' and '.join(chosen)} cannot be combined on one server: "
                                 "choose one way to authenticate")
        return data

    @model_validator(mode="after")
    def _transport(self) -> ServerSettings:
        if self.http:
            for key, value in _PRESETS[self.protocol].items():
                if key not in self.model_fields_set:
                    object.__setattr__(self, key, value)
            return self
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


class _Client(Protocol):
    """What `check_servers` reads of an [oauth_clients.NAME] (settings.OAuthClientSettings)."""

    @property
    def provider(self) -> str: ...
    @property
    def grant(self) -> str: ...
    @property
    def scopes(self) -> list[str] | None: ...


def check_servers(servers: Mapping[str, ServerSettings], clients: Mapping[str, _Client]) -> None:
    """The checks of each server that need the rest of the configuration: its OAuth client
    exists; an SMTP server gets the provider's host and encryption; an HTTP server's
    client serves that API only (a token is for one audience); `fallback_server` names
    another server. Raises ValueError."""
    api_clients: dict[str, str] = {}
    for name, server in servers.items():
        if server.fallback_server is not None:
            fallback = server.fallback_server
            if not server.http:
                raise ValueError(f"servers.{name}.fallback_server is only for protocol = "
                                 "\"graph\" or \"gmail_api\" (a message over the API's size "
                                 "limit goes there)")
            if fallback == name or fallback not in servers:
                known = ", ".join(sorted(n for n in servers if n != name)) or "none"
                raise ValueError(f"servers.{name}.fallback_server = {fallback!r} must name "
                                 f"another [servers.NAME]; defined: {known}")
        if server.oauth is None:
            continue
        client = clients.get(server.oauth.client)
        if client is None:
            raise ValueError(f"servers.{name}.oauth.client = {server.oauth.client!r} names "
                             "no [oauth_clients] entry")
        if server.http:
            _api_client(name, server, server.oauth.client, client, api_clients)
            continue
        provider: tuple[str | None, Encryption] = _PROVIDER_SERVERS.get(
            client.provider, (None, "starttls"))
        host, enc = provider
        if host is None and server.host is None:
            raise ValueError(f"servers.{name}.host is required with a generic OAuth provider")
        server._fill_transport(host, enc)
    for name, server in servers.items():
        user = api_clients.get(server.oauth.client) if server.oauth is not None else None
        if user is not None and servers[user].protocol != server.protocol:
            raise ValueError(
                f"oauth_clients.{server.oauth.client if server.oauth else ''} serves "
                f"servers.{name} ({server.protocol}) and servers.{user} "
                f"({servers[user].protocol}): their tokens are for different APIs; give "
                "each its own [oauth_clients] entry")


def _api_client(name: str, server: ServerSettings, key: str, client: _Client,
                seen: dict[str, str]) -> None:
    """An HTTP server's OAuth client: the right provider, for this API only."""
    seen.setdefault(key, name)
    if (client.provider, server.protocol) in (("google", "graph"), ("microsoft", "gmail_api")):
        raise ValueError(f"servers.{name}: protocol = \"{server.protocol}\" cannot use "
                         f"oauth_clients.{key} (provider = \"{client.provider}\"): Graph takes "
                         "Microsoft tokens, the Gmail API Google ones")
