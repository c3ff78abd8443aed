"""Every file the configuration names (CA files, secret files, OAuth clients' private keys
and certificates, the token store), opened at `check`, at start and at reload: missing,
unreadable, wrong mode, not PEM, a client certificate that is not its key's is an
invalid configuration, with the key, the path and the problem. A client certificate
that has expired is not: the daemon runs and holds the mail until it is renewed, and
`check` reports it as an error (`credential_errors`); one expiring within 30 days is a
warning (relay.settings.credentials)."""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
from pathlib import Path

from relay.settings.credentials import client_certificate, expired, expiry_warning
from relay.settings.model import Settings
from relay.settings.values import file_error, secret_path

# --- the files the configuration names ------------------------------------------------------

_SECRET_MODE = 0o002
"""Every user may write: anyone could replace the secret (a refused configuration)."""
_READABLE_BY_OTHERS = 0o004


def named_files(settings: Settings) -> list[tuple[str, Path, str]]:
    """(key, path, kind) for every file the configuration names; kind "ca", "secret",
    "private" (a private key: mode 0600 enforced) or "certificate"."""
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
        for key, kind in (("client_certificate_file", "certificate"),
                          ("client_key_file", "private"), ("service_account_file", "private")):
            if (path := getattr(client, key)) is not None:
                found.append((f"oauth_clients.{name}.{key}", path, kind))
    if settings.admin.token_file is not None:
        found.append(("admin.token_file", settings.admin.token_file, "secret"))
    if settings.fleet is not None:
        found += settings.fleet.files()
    return [(key, path if kind == "ca" else secret_path(path), kind)
            for key, path, kind in found]


def file_problems(settings: Settings) -> list[str]:
    """Each named file that is missing, unreadable, writable by others (secrets) or not PEM
    (CA files), and a token store the relay cannot use: one line each, with the key, the
    path, the problem and the fix. Checked by `check`, at start and at reload."""
    problems: list[str] = []
    for key, path, kind in named_files(settings):
        if kind in ("private", "certificate"):
            continue  # below, with what they belong to
        problem = _ca_problem(path) if kind == "ca" else _secret_problem(path)
        if problem:
            problems.append(f"{key} = {str(path)!r}: {problem}")
    for name, client in settings.oauth_clients.items():
        if client.client_certificate_file is None or client.client_key_file is None:
            continue  # a service_account_file is read, and checked, at validation
        try:
            client_certificate(f"oauth_clients.{name}", client.client_certificate_file,
                               client.client_key_file)
        except ValueError as e:
            problems.append(str(e))
    if any(server.oauth is not None for server in settings.servers.values()):
        problems += _token_store_problems(settings.state_dir / "tokens")
    return problems


def credential_errors(settings: Settings) -> list[str]:
    """What `check` reports as errors in a valid configuration: client certificates that
    have expired (the daemon runs, but holds the mail until they are renewed)."""
    found: list[str] = []
    for name, client in settings.oauth_clients.items():
        if client.client_certificate_file is None or client.client_key_file is None:
            continue
        try:
            certificate = client_certificate(f"oauth_clients.{name}",
                                             client.client_certificate_file,
                                             client.client_key_file)
        except ValueError as e:
            found.append(str(e))  # replaced since it was validated
            continue
        if reason := expired(certificate):
            path = secret_path(client.client_certificate_file)
            found.append(f"oauth_clients.{name}.client_certificate_file = {str(path)!r}: "
                         f"{reason}; until then the relay holds the mail")
    return found


def file_warnings(settings: Settings) -> list[str]:
    """Secret files that other users may read (valid, but the secret may have leaked), and
    client certificates that expire within 30 days."""
    found: list[str] = []
    for name, client in settings.oauth_clients.items():
        if client.client_certificate_file is not None:
            warning = expiry_warning(f"oauth_clients.{name}", client.client_certificate_file)
            found += [warning] if warning else []
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
