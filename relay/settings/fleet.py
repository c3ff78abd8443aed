"""`[fleet]`: several relays sending for one system account through Redis or Valkey
(relay.fleet). Absent: the relay is on its own and needs no Redis."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, model_validator

from relay.settings.values import Duration, _read_key, _Section

_SCHEMES = ("redis", "rediss", "unix")


class FleetSettings(_Section):
    url: str
    """redis://[user@]host:6379/0, rediss://host:6380/0 (TLS), unix:///run/redis.sock?db=0"""
    ca_file: Path | None = None
    """rediss:// only: the CA that signed Redis's certificate (else the system's)."""
    password: SecretStr | None = None
    password_file: Path | None = None
    key_prefix: str | None = None
    """Every key the relay writes starts with it; default "sysmail-relay:<address>:", so
    that several accounts or environments share one Redis."""
    node_name: str | None = None
    """This relay's name in the fleet; default the host name and a hash of state_dir."""
    token_key_file: Path | None = None
    """32 random bytes as 64 hex digits (`openssl rand -hex 32`): with it, the OAuth tokens
    are shared by the fleet, encrypted with it in Redis (AES-GCM)."""
    heartbeat: Annotated[Duration, Field(ge=1, le=60)] = 5.0
    """Seconds between this relay's heartbeats; it counts as gone after three missed."""
    timeout: Annotated[Duration, Field(ge=0.1, le=30)] = 2.0
    """Seconds a Redis command may take before Redis counts as unreachable."""

    @model_validator(mode="after")
    def _check(self) -> FleetSettings:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"url must start with redis://, rediss:// (TLS) or unix://, "
                             f"not {scheme + '://' if scheme else repr(self.url)}")
        if self.ca_file is not None and scheme != "rediss":
            raise ValueError("ca_file needs a rediss:// url (TLS)")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        if self.password_file is not None:
            secret = SecretStr(_read_key("password_file", self.password_file))
            object.__setattr__(self, "password", secret)
        if self.token_key_file is not None:
            token_key(self.token_key_file)
        if self.key_prefix is not None and not self.key_prefix.strip():
            raise ValueError("key_prefix must not be empty (leave it out for the default)")
        return self

    def files(self) -> list[tuple[str, Path, str]]:
        """(key, path, kind) for `relay.settings.files.named_files`."""
        found: list[tuple[str, Path, str]] = []
        if self.ca_file is not None:
            found.append(("fleet.ca_file", self.ca_file, "ca"))
        if self.password_file is not None:
            found.append(("fleet.password_file", self.password_file, "secret"))
        if self.token_key_file is not None:
            found.append(("fleet.token_key_file", self.token_key_file, "secret"))
        return found


def token_key(path: Path) -> bytes:
    """The 32-byte key in `token_key_file`. ValueError names the file and the fix."""
    text = _read_key("token_key_file", path).strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"token_key_file: {path} must hold 64 hex digits (32 random bytes); "
                         f"make one with `openssl rand -hex 32 > {path}` and chmod 600 it "
                         "(the same file for every relay of the fleet)")
    return key
