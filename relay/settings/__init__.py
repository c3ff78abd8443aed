"""The configuration: one TOML file, `RELAY_` environment variables and secret files.

Loaded once at start-up (and again at SIGHUP), validated as a whole, and passed
down. `load_settings()` is the only entry point; it raises `ConfigError` with one
line per mistake, each naming the key path, the bad value (never a secret's) and
what is allowed. Every file the configuration names (CA files, secret files, OAuth
clients' keys and certificates, the token store) is opened then too (`file_problems`),
so a missing or unusable one is an invalid configuration for `check`, at start and at
reload; `credential_errors()` is what `check` also reports as an error although the
daemon runs with it (an expired client certificate: the mail is held).

`values` holds the value types, `model` the sections and keys (`servers` those of
[servers.NAME], `oauth` those of [oauth_clients.NAME], `fleet` those of [fleet]),
`load` where they come from, `files` the checks of the files they name
(`credentials` reads private keys and client certificates), `disk` whether
state_dir's file system keeps the spool across a power cut; everything is imported
from here. It may import only `relay.errors`.
"""

from relay.settings.files import (
    credential_errors,
    file_problems,
    file_warnings,
    named_files,
)
from relay.settings.fleet import FleetSettings
from relay.settings.load import (
    OVERRIDES_FILE,
    admin_token,
    config_path,
    load_settings,
    overlay,
    override_path,
    read_config_file,
    read_layers,
    validate,
    warnings,
)
from relay.settings.model import (
    AdminSettings,
    ListenerSettings,
    LogSettings,
    QueueSettings,
    ServerSeries,
    Settings,
    SystemAccountSettings,
)
from relay.settings.oauth import OAuthClientSettings
from relay.settings.servers import (
    AuthSettings,
    PopBeforeSmtpSettings,
    ServerOAuthSettings,
    ServerSettings,
)
from relay.settings.values import (
    DEFAULT_ADDRESS,
    DEFAULT_CONFIG_FILE,
    LOCAL_SERVER,
    Address,
    Duration,
    Encryption,
    Port,
    RateLimit,
    Timeout,
    default_state_dir,
    file_error,
    parse_duration,
    read_secret_file,
    secret_path,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_CONFIG_FILE",
    "LOCAL_SERVER",
    "OVERRIDES_FILE",
    "Address",
    "AdminSettings",
    "AuthSettings",
    "Duration",
    "Encryption",
    "FleetSettings",
    "ListenerSettings",
    "LogSettings",
    "OAuthClientSettings",
    "PopBeforeSmtpSettings",
    "Port",
    "QueueSettings",
    "RateLimit",
    "ServerOAuthSettings",
    "ServerSeries",
    "ServerSettings",
    "Settings",
    "SystemAccountSettings",
    "Timeout",
    "admin_token",
    "config_path",
    "credential_errors",
    "default_state_dir",
    "file_error",
    "file_problems",
    "file_warnings",
    "load_settings",
    "named_files",
    "overlay",
    "override_path",
    "parse_duration",
    "read_config_file",
    "read_layers",
    "read_secret_file",
    "secret_path",
    "validate",
    "warnings",
]
