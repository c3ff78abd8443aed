"""Signed credentials for the tests' authorization server (tests/oauth_server.py).

Made with `cryptography`, real as the providers' are: a client certificate with its
key (Entra ID's certificate credentials, `private_key_jwt`) and a Google-style
service account (its JSON key, and the scopes a Workspace administrator delegated to
its client ID). `Checks` is the server's side: strict about every assertion it is
sent, as Entra ID and Google are documented to be.

- private_key_jwt (RFC 7523 2.2): the signature against the registered certificate's
  key, `x5t#S256` (or `x5t`) equal to its thumbprint, iss = sub = client_id, aud =
  the token URL, exp in the future and at most 10 minutes after iat, a jti never seen
  before.
- JWT bearer grant (RFC 7523 2.1): the service account named by iss, the signature
  against its key (and `kid` its key ID), aud = the token URL, exp at most an hour
  after iat, a sub in the domain, and every scope delegated to its client ID; else
  `unauthorized_client` as Google answers.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_MAX = 600
BEARER_ASSERTION_MAX = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Certificate:
    """A self-signed client certificate and its key, as `New-SelfSignedCertificate` or
    `openssl req -x509` make for an app registration."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @classmethod
    def make(cls, days: float = 365, valid_since_days: float = 1,
             name: str = "sysmail-relay") -> Certificate:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=valid_since_days))
                .not_valid_after(now + datetime.timedelta(days=days))
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    def thumbprint_sha256(self) -> str:
        return b64url(self.cert.fingerprint(hashes.SHA256()))

    def thumbprint_sha1(self) -> str:
        return b64url(self.cert.fingerprint(hashes.SHA1()))

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, directory: Path, name: str = "client", key_mode: int = 0o600,
              key: rsa.RSAPrivateKey | None = None) -> tuple[Path, Path]:
        """(certificate file, key file); `key` writes another key beside it."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
        cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_key_pem(key or self.key))
        key_file.chmod(key_mode)
        return cert_file, key_file


@dataclass
class ServiceAccount:
    """A Google service account: its JSON key, and what the Workspace administrator
    delegated to its client ID (Admin console, domain-wide delegation)."""

    client_email: str = "relay@sysmail-test.iam.gserviceaccount.com"
    client_id: str = field(default_factory=lambda: str(100000000000000000000
                                                       + secrets.randbelow(10 ** 20)))
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    private_key_id: str = field(default_factory=lambda: secrets.token_hex(20))
    delegated: set[str] = field(default_factory=set)
    domain: str = "example.com"

    def json_key(self, token_uri: str, key: rsa.RSAPrivateKey | None = None) -> dict[str, str]:
        return {"type": "service_account", "project_id": "sysmail-test",
                "private_key_id": self.private_key_id,
                "private_key": _key_pem(key or self.key).decode(),
                "client_email": self.client_email, "client_id": self.client_id,
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri}

    def write(self, path: Path, token_uri: str, mode: int = 0o600,
              key: rsa.RSAPrivateKey | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.json_key(token_uri, key), indent=2))
        path.chmod(mode)
        return path


def _unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = assertion.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")

    def part(text: str) -> dict[str, Any]:
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    return part(parts[0]), part(parts[1])


@dataclass
class Checks:
    """The server's checks of signed assertions, and the jti values it has seen."""

    certificates: dict[str, x509.Certificate] = field(default_factory=dict)
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    seen: dict[str, float] = field(default_factory=dict)  # jti -> exp
    assertions: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # every assertion as sent

    def _verify(self, assertion: str, public: Any, alg: str) -> dict[str, Any]:
        key = (RSAKey if isinstance(public, rsa.RSAPublicKey) else ECKey).import_key(
            public.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo))
        claims: dict[str, Any] = jwt.decode(assertion, key, algorithms=[alg]).claims
        return claims

    def _lifetime(self, claims: dict[str, Any], most: int) -> str | None:
        now = time.time()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            return "exp and iat are required"
        if exp <= now:
            return "the assertion has expired"
        if exp - iat > most:
            return f"the assertion lives {exp - iat:.0f} s, more than {most} s"
        if iat > now + 300:
            return "iat is in the future"
        return None

    def client(self, client_id: str, assertion: str, token_url: str) -> tuple[str, str | None]:
        """(the client, why its private_key_jwt assertion is refused or None)."""
        try:
            header, unverified = _unverified(assertion)
        except ValueError:
            return client_id, "the client_assertion is not a JWT"
        self.assertions.append((header, unverified))
        self.raw.append(assertion)
        client_id = client_id or str(unverified.get("iss", ""))
        return client_id, self._client(client_id, assertion, header, token_url)

    def _client(self, client_id: str, assertion: str, header: dict[str, Any],
                token_url: str) -> str | None:
        cert = self.certificates.get(client_id)
        if cert is None:
            return f"no certificate is registered for client {client_id}"
        sha256 = b64url(cert.fingerprint(hashes.SHA256()))
        sha1 = b64url(cert.fingerprint(hashes.SHA1()))
        if header.get("x5t#S256", sha256) != sha256 or header.get("x5t", sha1) != sha1 or \
                not {"x5t#S256", "x5t"} & set(header):
            return "AADSTS700027: the certificate with the assertion's thumbprint is not " \
                   "registered for the application"
        if header.get("alg") not in ("RS256", "PS256"):
            return f"alg {header.get('alg')} is not accepted"
        try:
            claims = self._verify(assertion, cert.public_key(), str(header["alg"]))
        except JoseError:
            return "AADSTS700027: the client assertion's signature does not verify"
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            return "iss and sub must be the client_id"
        if claims.get("aud") != token_url:
            return f"aud must be {token_url}"
        problem = self._lifetime(claims, CLIENT_ASSERTION_MAX)
        if problem:
            return f"AADSTS700024: {problem}"
        return self._once(claims)

    def _once(self, claims: dict[str, Any]) -> str | None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            return "jti is required"
        now = time.time()
        self.seen = {k: v for k, v in self.seen.items() if v > now}
        if jti in self.seen:
            return "AADSTS700025: the client assertion (jti) was already used"
        self.seen[jti] = float(claims["exp"])
        return None

    def bearer(self, assertion: str,
               token_url: str) -> tuple[str, str, str] | dict[str, str]:
        """The JWT bearer grant: (client ID, subject, scope), or the error Google answers."""
        try:
            header, unverified = _unverified(assertion)
        except ValueError:
            return {"error": "invalid_grant", "error_description": "Invalid JWT."}
        self.assertions.append((header, unverified))
        self.raw.append(assertion)
        account = self.service_accounts.get(str(unverified.get("iss", "")))
        if account is None:
            return {"error": "invalid_grant", "error_description": "Invalid issuer."}
        if header.get("alg") != "RS256" or header.get("kid", account.private_key_id) != \
                account.private_key_id:
            return {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        try:
            claims = self._verify(assertion, account.key.public_key(), "RS256")
        except JoseError:
            return {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if claims.get("aud") != token_url:
            return {"error": "invalid_grant", "error_description": "Invalid JWT: aud"}
        problem = self._lifetime(claims, BEARER_ASSERTION_MAX) or self._once(claims)
        if problem:
            return {"error": "invalid_grant", "error_description": f"Invalid JWT: {problem}"}
        sub, scope = str(claims.get("sub", "")), str(claims.get("scope", ""))
        if sub not in self.users:
            return {"error": "invalid_grant", "error_description": "Invalid email or User ID"}
        if not scope.split() or not set(scope.split()) <= account.delegated:
            return {"error": "unauthorized_client",
                    "error_description": "Client is unauthorized to retrieve access tokens "
                                         "using this method, or client not authorized for "
                                         "any of the scopes requested."}
        return account.client_id, sub, scope
