"""The files an OAuth client proves itself with: private keys (a client certificate's
key, a Google service-account JSON key) and client certificates.

A private file is refused when group or others may read or write it, as a token file
is (relay.oauth.store): the error names the file and the `chmod` that fixes it. A
client certificate (PEM) is read with its key: `client_certificate` refuses one that
is not PEM or does not belong to the key (a configuration error: refused at start and
reload), and gives its SHA-1 and SHA-256 thumbprints (what Entra ID shows and wants in
`x5t` / `x5t#S256`) and its expiry. An expired certificate is not a configuration
error: the daemon runs and holds the mail (`expired()` is the reason it shows), `check`
reports it as an error and warns EXPIRY_WARNING_DAYS before; relay.metrics exports the
date. Used by `check`, at start and reload (relay.settings.files) and for every
assertion (relay.oauth.assertions). Never puts key material into a message. `cryptography` is
imported only when a certificate is read, so that `sysmail-sendmail` starts light.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.settings.values import file_error, secret_path

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

EXPIRY_WARNING_DAYS = 30
_OTHERS = 0o077
"""Group or others may read or write: a private file that may have leaked."""


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate and its private key, checked to belong together."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def algorithm(self) -> str:
        from cryptography.hazmat.primitives.asymmetric import rsa
        return "RS256" if isinstance(self.key, rsa.RSAPrivateKey) else "ES256"

    def thumbprint(self, algorithm: hashes.HashAlgorithm) -> bytes:
        return self.certificate.fingerprint(algorithm)

    @property
    def shown_thumbprint(self) -> str:
        """The SHA-1 thumbprint in hex, as Entra ID lists certificates."""
        from cryptography.hazmat.primitives import hashes
        return self.thumbprint(hashes.SHA1()).hex().upper()

    def key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def read_private(key: str, path: Path) -> bytes:
    """A private file's bytes (a relative path is looked up in $CREDENTIALS_DIRECTORY).
    ValueError, naming the key, the path and the fix, when it cannot be read or group
    or others may read or write it."""
    path = secret_path(path)
    try:
        with path.open("rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            data = f.read(1 << 20)
    except OSError as e:
        raise ValueError(f"{key} = {str(path)!r}: {file_error(e)}") from None
    if mode & _OTHERS:
        raise ValueError(f"{key} = {str(path)!r} may be read by other users (mode "
                         f"{mode:04o}), so the relay refuses it: chmod 600 {path} (Kubernetes: "
                         "defaultMode: 0400), and replace the key if it may have leaked")
    return data


def read_certificate(key: str, path: Path) -> x509.Certificate:
    """The first certificate of a PEM file. ValueError naming the key, path and fix."""
    from cryptography import x509
    path = secret_path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{key} = {str(path)!r}: {file_error(e)}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{key} = {str(path)!r}: not a PEM certificate (no \"-----BEGIN "
                         "CERTIFICATE-----\"); convert it with `openssl x509 -inform der -in "
                         "cert.cer -out cert.pem`") from None


def client_certificate(prefix: str, certificate_file: Path, key_file: Path) -> ClientCertificate:
    """The certificate and key of `prefix` (oauth_clients.NAME). ValueError when either
    cannot be used: unreadable, key readable by others, not PEM, encrypted, a key type
    the providers do not take, or not a pair. An expired one is returned: see `expired`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    cert = read_certificate(f"{prefix}.client_certificate_file", certificate_file)
    data = read_private(f"{prefix}.client_key_file", key_file)
    where = f"{prefix}.client_key_file = {str(secret_path(key_file))!r}"
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{where}: the key is encrypted with a passphrase; store it "
                         "unencrypted, mode 0600 (`openssl pkey -in key.pem -out "
                         "plain.pem`)") from None
    except ValueError:
        raise ValueError(f"{where}: not a PEM private key (\"-----BEGIN PRIVATE KEY-----\"); "
                         "export the certificate's key as PEM") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) or (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and not isinstance(key.curve, ec.SECP256R1)):
        raise ValueError(f"{where}: a {type(key).__name__.removeprefix('_')} key; the providers "
                         "take RSA keys (2048 bits or more) for client certificates")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, public) != key.public_key().public_bytes(der, public):
        raise ValueError(f"{where} is not the key of {prefix}.client_certificate_file = "
                         f"{str(secret_path(certificate_file))!r}: put the certificate and "
                         "the private key made with it side by side")
    return ClientCertificate(cert, key)


def expired(found: ClientCertificate, now: float | None = None) -> str | None:
    """Why the provider will refuse the certificate when it has expired (the reason mail
    is held, shown by `status`); None while it is valid."""
    if found.not_after > (time.time() if now is None else now):
        return None
    return (f"the client certificate {found.shown_thumbprint} expired on "
            f"{found.certificate.not_valid_after_utc:%Y-%m-%d}: upload a new one in "
            "Certificates & secrets and write it to client_certificate_file (and its key "
            "to client_key_file)")


def expiry_warning(prefix: str, certificate_file: Path, now: float | None = None) -> str | None:
    """A warning when the certificate expires within EXPIRY_WARNING_DAYS; None otherwise
    (and when it cannot be read: that is a problem, reported by `client_certificate`)."""
    try:
        cert = read_certificate(f"{prefix}.client_certificate_file", certificate_file)
    except ValueError:
        return None
    left = cert.not_valid_after_utc.timestamp() - (time.time() if now is None else now)
    if not 0 < left <= EXPIRY_WARNING_DAYS * 86400:
        return None
    return (f"{prefix}.client_certificate_file expires on {cert.not_valid_after_utc:%Y-%m-%d} "
            f"(in {left / 86400:.0f} days): then the provider refuses the relay's token "
            "requests and mail is held; make a new certificate, upload it to the app "
            "registration beside the old one, and put it and its key here")
