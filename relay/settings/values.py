"""The value types of the configuration: durations, rates, addresses, ports, secrets."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    model_validator,
)

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


def _workers(value: Any) -> Any:
    """listener.workers: "auto" or a number of processes, 1..64, in one message."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and 1 <= value <= 64):
        return value
    if isinstance(value, str) and value.isdigit() and 1 <= int(value) <= 64:
        return int(value)  # from an environment variable
    raise ValueError(f'must be "auto" (the CPUs the relay may use, at most 8) or a number '
                     f'of intake processes from 1 to 64, not {value!r}')


Workers = Annotated[Literal["auto"] | int, BeforeValidator(_workers)]


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


def _read_key(key: str, path: Path) -> str:
    try:
        return read_secret_file(path)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def default_state_dir(env: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/sysmail-relay, else ~/.local/state/..."""
    if systemd := env.get("STATE_DIRECTORY"):
        return Path(systemd.split(":")[0])
    if xdg := env.get("XDG_STATE_HOME"):
        return Path(xdg) / "sysmail-relay"
    return Path.home() / ".local" / "state" / "sysmail-relay"
