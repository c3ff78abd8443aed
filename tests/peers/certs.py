"""Test PKI: a trusted CA, a server cert for localhost/127.0.0.1, and two bad certs.

- ``server``: issued by the trusted CA for ``localhost`` and ``127.0.0.1``.
- ``untrusted``: same names, issued by a second CA that clients do not trust.
- ``wrong_name``: issued by the trusted CA, but only for ``wrong.example``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.peers.procutil import make_dir, write_file

SERVER_NAMES = ("localhost", "127.0.0.1")
WRONG_NAME = "wrong.example"


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate chain (leaf first) and its private key."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class PeerPKI:
    ca_file: Path  # trusted CA: give this to clients
    untrusted_ca_file: Path  # the CA that issued ``untrusted`` (clients should NOT trust it)
    server: CertPair
    untrusted: CertPair
    wrong_name: CertPair


def _write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> CertPair:
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    cert = write_file(directory / f"{name}.crt", chain.decode("ascii"), mode=0o644)
    key = write_file(directory / f"{name}.key", leaf.private_key_pem.bytes().decode("ascii"), 0o600)
    return CertPair(cert_file=cert, key_file=key)


def make_pki(directory: Path) -> PeerPKI:
    """Create the CAs and certificates as PEM files under *directory*."""
    make_dir(directory, 0o755)
    ca = trustme.CA(organization_name="sysmail-relay test CA")
    rogue = trustme.CA(organization_name="sysmail-relay UNTRUSTED CA")
    ca_file = write_file(directory / "ca.crt", ca.cert_pem.bytes().decode("ascii"))
    rogue_file = write_file(directory / "untrusted-ca.crt", rogue.cert_pem.bytes().decode("ascii"))
    return PeerPKI(
        ca_file=ca_file,
        untrusted_ca_file=rogue_file,
        server=_write_leaf(directory, "server", ca.issue_cert(*SERVER_NAMES)),
        untrusted=_write_leaf(directory, "untrusted", rogue.issue_cert(*SERVER_NAMES)),
        wrong_name=_write_leaf(directory, "wrong-name", ca.issue_cert(WRONG_NAME)),
    )
