"""The configuration: one TOML file, `RELAY_` environment variables and secret files.

Loaded once at start-up (and again at SIGHUP), validated as a whole, and passed
down. `load_settings()` is the only entry point; it raises `ConfigError` with one
line per mistake, each naming the key path, the bad value (never a secret's) and
what is allowed. Every file the configuration names (CA files, secret files, the
token store) is opened then too (`file_problems`), so a missing or unusable one is
an invalid configuration for `check`, at start and at reload.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/sysmail-relay/relay.toml")
LOCAL_SERVER = "local"
DEFAULT_ADDRESS = "relay@localhost"
"""The built-in server: writes each message into the Maildir `<state_dir>/outbox`."""

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def parse_duration(value: object) -> float:
    """'30s', '15m', '5d', '1.5h' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '15m', '5d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration such as '30s', '15m', '5d', not {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be greater than 0")
    return seconds


def _check_address(value: str) -> str:
    if not _ADDRESS.match(value):
        raise ValueError(f"{value!r} is not an e-mail address of the form local-part@domain")
    return value


def _between(low: int, high: int, unit: str = "") -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}{unit}")
        return value

    return AfterValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Address = Annotated[str, AfterValidator(_check_address)]
Timeout = Annotated[int, _between(1, 120, " seconds")]
Port = Annotated[int, _between(1, 65535)]
Encryption = Literal["none", "tls", "starttls"]


class RateLimit(BaseModel):
    """'30/min': at most `count` messages per `seconds`."""

    model_config = ConfigDict(frozen=True)
    count: int
    seconds: int

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if isinstance(value, str):
            m = _RATE.match(value)
            if not m or int(m.group(1)) < 1:
                raise ValueError(f"expected messages per interval such as '30/min', not {value!r}")
            return {"count": int(m.group(1)), "seconds": _RATE_UNITS[m.group(2)]}
        return value

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h", 86400: "day"}[self.seconds]
        return f"{self.count}/{unit}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Secret(_Section):
    """A section with `password` or `password_file` (a Docker/Kubernetes/systemd secret)."""

    password: SecretStr | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _read_password_file(self) -> _Secret:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        if self.password_file is not None:
            object.__setattr__(self, "password", SecretStr(_read_key("password_file",
                                                                     self.password_file)))
        if self.password is None:
            raise ValueError("a password is required: set password_file (or password)")
        return self

    def secret(self) -> str:
        assert self.password is not None
        return self.password.get_secret_value()


def secret_path(path: Path) -> Path:
    """A secret file's path; a relative one is looked up in $CREDENTIALS_DIRECTORY (systemd)."""
    if not path.is_absolute() and (creds := os.environ.get("CREDENTIALS_DIRECTORY")):
        return Path(creds) / path
    return path


def read_secret_file(path: Path) -> str:
    """Read a secret file (see `secret_path`). ValueError names the path and the problem."""
    path = secret_path(path)
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"cannot read secret file {path}: {file_error(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {path} is not UTF-8 text") from None


def file_error(e: OSError) -> str:
    """What went wrong with a named file, and the fix, for a person."""
    if isinstance(e, FileNotFoundError):
        return "no such file; create it or correct the path"
    if isinstance(e, PermissionError):
        return "permission denied; let the relay's user read it (chown or chmod)"
    return e.strerror or str(e)


def _loopback() -> list[IPv4Network | IPv6Network]:
    return [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]


class ListenerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 2525
    allowed_networks: list[IPv4Network | IPv6Network] = Field(default_factory=_loopback)
    max_message_size: Annotated[int, Field(ge=1024)] = 26_214_400
    max_recipients: Annotated[int, Field(ge=1)] = 100
    max_connections: Annotated[int, Field(ge=1)] = 500
    idle_timeout: Annotated[int, Field(ge=10, le=3600)] = 300
    hostname: str | None = None


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


def default_state_dir(env: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/sysmail-relay, else ~/.local/state/..."""
    if systemd := env.get("STATE_DIRECTORY"):
        return Path(systemd.split(":")[0])
    if xdg := env.get("XDG_STATE_HOME"):
        return Path(xdg) / "sysmail-relay"
    return Path.home() / ".local" / "state" / "sysmail-relay"


def config_path(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """--config, else $RELAY_CONFIG, else /etc/sysmail-relay/relay.toml if it exists, else None."""
    if explicit is not None:
        return explicit
    if from_env := env.get("RELAY_CONFIG"):
        return Path(from_env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


OVERRIDES_FILE = "overrides.toml"
"""Written in state_dir by the admin page's Change form; layered over the TOML file."""


def load_settings(path: Path | None, overrides: Path | None = None) -> Settings:
    """Read, merge and validate the configuration. Raises ConfigError.

    The override file (default: `<state_dir>/overrides.toml`, when it exists) is
    layered over the TOML file: see `read_layers`.
    """
    return validate(*read_layers(path, overrides))


def read_layers(path: Path | None, overrides: Path | None = None) -> tuple[dict[str, Any], str]:
    """The TOML file with the override file layered over it, unvalidated, and a description
    of where it came from. Override tables merge key by key, except `[servers.NAME]`,
    which replaces the file's table of that name whole (so that the Change form can
    switch authentication off or put a password in place of a password_file)."""
    data = read_config_file(path)
    source = str(path) if path else "the built-in default"
    overrides = overrides or override_path(data)
    if overrides.exists():
        overlay(data, _read_toml(overrides))
        source += f" with {overrides}"
    return data, source


def read_config_file(path: Path | None) -> dict[str, Any]:
    """One TOML file as it is written (None: the built-in default, empty). ConfigError."""
    return _read_toml(path) if path is not None else {}


def overlay(data: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Layer override data over file data in place (see `read_layers`)."""
    layer = dict(layer)
    servers = layer.pop("servers", None)
    _merge(data, layer)
    if isinstance(servers, Mapping):
        base = data.get("servers")
        data["servers"] = {**(base if isinstance(base, Mapping) else {}), **servers}


def override_path(data: Mapping[str, Any]) -> Path:
    """`<state_dir>/overrides.toml` for this (unvalidated) configuration."""
    state = os.environ.get("RELAY_STATE_DIR") or data.get("state_dir")
    base = Path(state) if isinstance(state, str) else default_state_dir(os.environ)
    return base / OVERRIDES_FILE


def validate(data: Mapping[str, Any], source: str) -> Settings:
    """The settings model over merged data, and every file it names (`file_problems`);
    ConfigError with one line per mistake."""
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()], source) from None
    problems = file_problems(settings)
    if problems:
        raise ConfigError(problems, source)
    return settings


def _read_key(key: str, path: Path) -> str:
    try:
        return read_secret_file(path)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


# --- the files the configuration names ------------------------------------------------------

_SECRET_MODE = 0o002
"""Every user may write: anyone could replace the secret (a refused configuration)."""
_READABLE_BY_OTHERS = 0o004


def named_files(settings: Settings) -> list[tuple[str, Path, str]]:
    """(key, path, kind) for every file the configuration names; kind "ca" or "secret"."""
    found: list[tuple[str, Path, str]] = []
    for name, server in settings.servers.items():
        key = f"servers.{name}"
        if server.ca_file is not None:
            found.append((f"{key}.ca_file", server.ca_file, "ca"))
        if server.auth is not None and server.auth.password_file is not None:
            found.append((f"{key}.auth.password_file", server.auth.password_file, "secret"))
        pop = server.pop_before_smtp
        if pop is not None and pop.ca_file is not None:
            found.append((f"{key}.pop_before_smtp.ca_file", pop.ca_file, "ca"))
        if pop is not None and pop.password_file is not None:
            found.append((f"{key}.pop_before_smtp.password_file", pop.password_file, "secret"))
    for name, client in settings.oauth_clients.items():
        if client.client_secret_file is not None:
            found.append((f"oauth_clients.{name}.client_secret_file", client.client_secret_file,
                          "secret"))
    if settings.admin.token_file is not None:
        found.append(("admin.token_file", settings.admin.token_file, "secret"))
    return [(key, secret_path(path) if kind == "secret" else path, kind)
            for key, path, kind in found]


def file_problems(settings: Settings) -> list[str]:
    """Each named file that is missing, unreadable, writable by others (secrets) or not PEM
    (CA files), and a token store the relay cannot use: one line each, with the key, the
    path, the problem and the fix. Checked by `check`, at start and at reload."""
    problems: list[str] = []
    for key, path, kind in named_files(settings):
        problem = _ca_problem(path) if kind == "ca" else _secret_problem(path)
        if problem:
            problems.append(f"{key} = {str(path)!r}: {problem}")
    if any(server.oauth is not None for server in settings.servers.values()):
        problems += _token_store_problems(settings.state_dir / "tokens")
    return problems


def file_warnings(settings: Settings) -> list[str]:
    """Secret files that other users may read (valid, but the secret may have leaked)."""
    found: list[str] = []
    for key, path, kind in named_files(settings):
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(path.stat().st_mode)
            if kind == "secret" and mode & _READABLE_BY_OTHERS:
                found.append(f"{key} = {str(path)!r} is readable by every user (mode "
                             f"{mode:04o}): chmod 600 it (Kubernetes: defaultMode: 0400)")
    if any(server.oauth is not None for server in settings.servers.values()):
        found += _open_token_files(settings.state_dir / "tokens")
    return found


def _ca_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        return file_error(e)
    if b"-----BEGIN CERTIFICATE-----" not in head:
        return ("not a PEM CA certificate (no \"-----BEGIN CERTIFICATE-----\"); convert it "
                "with `openssl x509 -inform der -in CA.der -out CA.pem`")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError as e:
        return f"not a usable PEM CA certificate ({e.reason or e}); export the CA again"
    except OSError as e:
        return file_error(e)
    return None


def _secret_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            f.read(1)
    except OSError as e:
        return file_error(e)
    if mode & _SECRET_MODE:
        return (f"writable by every user (mode {mode:04o}), who could replace the secret; "
                f"chmod 600 {path}")
    return None


def _token_store_problems(tokens: Path) -> list[str]:
    try:
        info = tokens.lstat()
    except FileNotFoundError:
        return []  # made (mode 0700) at the first sign-in
    except OSError as e:
        return [f"the token store {tokens}: {e.strerror}"]
    if not stat.S_ISDIR(info.st_mode):
        return [f"the token store {tokens} is not a directory; move it away (the relay makes "
                "the directory at the next sign-in)"]
    if not os.access(tokens, os.R_OK | os.W_OK | os.X_OK):
        return [f"the token store {tokens} is not writable by the relay's user; chown it"]
    return []


def _open_token_files(tokens: Path) -> list[str]:
    """Token files group or others may read: the store refuses them (mail is held)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for entry in sorted(tokens.iterdir()):
            mode = stat.S_IMODE(entry.lstat().st_mode)
            if entry.name.endswith(".json") and mode & 0o077:
                found.append(f"the token file {entry} is readable by others (mode {mode:04o}), "
                             f"so the relay refuses it and holds the mail; chmod 600 {entry} "
                             "(and sign in again if it may have leaked)")
    return found


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file; pass --config PATH or set RELAY_CONFIG"]) \
            from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


_SECRET_WORDS = ("password", "secret", "token")


def _describe(err: Mapping[str, Any]) -> str:
    """One line per mistake: key path, the bad value unless it is a secret, what is allowed."""
    loc = [str(part) for part in err["loc"] if not _is_type_tag(part)]
    key = ".".join(loc) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key; check the spelling against docs/configuration.md"
    if kind == "missing":
        return f"{key}: required, but not set"
    secret = any(word in key for word in _SECRET_WORDS)
    if kind == "list_type" and isinstance(err.get("input"), str) and not secret:
        items = ", ".join(f'"{item}"' for item in str(err["input"]).replace(",", " ").split())
        return f"{key}: a list is needed, even for one value: {loc[-1]} = [{items}]"
    value = err.get("input")
    repeated = isinstance(value, str) and repr(value) in msg
    hidden = secret or repeated or isinstance(value, dict | list)
    shown = "" if hidden else f" (got {value!r})"
    return f"{key}: {msg}{shown}"


def _is_type_tag(part: object) -> bool:
    # pydantic puts union member names such as 'IPv4Network' or 'function-after[...]' in locs
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def warnings(settings: Settings) -> list[str]:
    """What is valid but unwise; printed by `check` and logged at start."""
    found: list[str] = []
    for name, server in settings.servers.items():
        if not server.tls_verify:
            found.append(f"servers.{name}.tls_verify = false: the server's certificate is not "
                         "checked, so anyone on the path can read the mail and the password")
        if server.encryption == "none" and server.auth is not None:
            found.append(f"servers.{name}: the password is sent without encryption "
                         "(encryption = \"none\"): choose encryption = \"starttls\" or "
                         "\"tls\"")
        pop = server.pop_before_smtp
        if pop is not None and pop.encryption == "none" and not pop.apop:
            found.append(f"servers.{name}.pop_before_smtp: the POP password is sent without "
                         "encryption (encryption = \"none\", apop = false): choose "
                         "encryption = \"tls\" or \"starttls\", or apop = true")
    return found + file_warnings(settings)


def admin_token(admin: AdminSettings) -> str | None:
    """The admin token from `admin.token` or `admin.token_file`. Raises ConfigError."""
    if admin.token is not None:
        return admin.token.get_secret_value() or None
    if admin.token_file is not None:
        try:
            return read_secret_file(admin.token_file) or None
        except ValueError as e:
            raise ConfigError([f"admin.token_file: {e}"]) from None
    return None
