"""The token store: one JSON file per OAuth client and account under `<state_dir>/tokens`.

The directory is mode 0700 and every file 0600 whatever the umask (neither is made
through a symbolic link), written to a temporary name, fsynced and renamed into place
(then the directory fsynced), so a crash leaves the old token or the new one, never
half of one. A file that group or others could read is refused
(the tokens in it may have leaked): the error names the file and the `chmod` that
fixes it. Nothing here ever puts a token into a message, a log line or a repr.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from relay.errors import TokenStoreError
from relay.spool import state
from relay.spool.files import fsync_dir

SUFFIX = ".json"


@dataclass(frozen=True)
class StoredToken:
    """What the provider gave for one client and account, and when."""

    client: str
    account: str
    provider: str
    grant: str  # authorization_code | client_credentials | service_account
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # of the access token (epoch)
    obtained_at: float = 0.0  # when the access token was issued
    scopes: list[str] = field(default_factory=list)
    granted_at: float = 0.0  # when a person signed in (the refresh token's birth)
    refreshed_at: float = 0.0  # when the refresh token was last used successfully
    refused: str | None = None  # why the provider refused it (invalid_grant), for `status`

    def fresh(self, now: float, margin: float) -> bool:
        """An access token that stays valid for at least the refresh margin.

        The margin is `margin`, or half the token's lifetime when that is shorter (a
        provider that issues 5-minute tokens gets them used for 2.5 minutes).
        """
        if self.access_token is None or self.refused:
            return False
        if self.expires_at is None:
            return True
        lifetime = max(0.0, self.expires_at - self.obtained_at)
        return self.expires_at - now > min(margin, lifetime / 2)

    def refused_now(self, reason: str) -> StoredToken:
        """The record kept after the provider refused the refresh token: no secrets left."""
        return replace(self, access_token=None, refresh_token=None, expires_at=None,
                       refused=reason)


class TokenStore:
    """The files under one directory. Blocking: call from a thread in the daemon."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, client: str, account: str) -> Path:
        return self.directory / f"{quote(client, safe='')}--{quote(account, safe='@')}{SUFFIX}"

    def load(self, client: str, account: str, *, check_mode: bool = True) -> StoredToken | None:
        """The stored token, or None when there is none. Raises TokenStoreError.

        `check_mode=False` only for `oauth revoke`, which must revoke a leaked token too.
        """
        return self._read(self.path(client, account), check_mode)

    def all(self) -> list[StoredToken | TokenStoreError]:
        """Every token file, for `oauth status`: the token, or why it cannot be used."""
        found: list[StoredToken | TokenStoreError] = []
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                token = self._read(path)
            except TokenStoreError as e:
                found.append(e)
                continue
            if token is not None:
                found.append(token)
        return found

    def _read(self, path: Path, check_mode: bool = True) -> StoredToken | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TokenStoreError(f"cannot read the token file {path}: {e.strerror}; it must "
                                  "belong to the relay's user with mode 0600") from None
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077 and check_mode:
                raise TokenStoreError(
                    f"refusing the token file {path}: mode {mode:04o} lets group or others "
                    f"read it. Fix: chmod 600 {path} (and, if someone else may have read it, "
                    "`sysmail-relay oauth revoke` and sign in again)")
            raw = f.read()
        try:
            data = json.loads(raw)
            return _token(data)
        except (ValueError, TypeError, KeyError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            raise TokenStoreError(
                f"the token file {path} is damaged ({reason}); remove it and run "
                "`sysmail-relay oauth authorize` again") from None

    def save(self, token: StoredToken) -> Path:
        """Write atomically with mode 0600 in a 0700 directory. Raises TokenStoreError."""
        path = self.path(token.client, token.account)
        try:
            self._directory()
            state.write_atomically(path, json.dumps(asdict(token), indent=2).encode())
        except OSError as e:
            raise TokenStoreError(f"cannot store the token in {self.directory}: "
                                  f"{e.strerror}; the relay's user must be able to write "
                                  "there") from None
        return path

    def delete(self, client: str, account: str) -> bool:
        try:
            self.path(client, account).unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise TokenStoreError(f"cannot remove {self.path(client, account)}: "
                                  f"{e.strerror}") from None
        fsync_dir(self.directory)
        return True

    def _directory(self) -> None:
        state.private_dir(self.directory)


def _token(data: dict[str, Any]) -> StoredToken:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    known = {k: v for k, v in data.items() if k in StoredToken.__dataclass_fields__}
    return StoredToken(**known)

