"""The accounts the peers know, with their passwords (test values, not secrets)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    username: str  # exactly what the client sends
    password: str


# Dovecot passwd-file users ({PLAIN} so CRAM-MD5, DIGEST-MD5 and APOP work).
NOTIFY = Account("notify", "s3cret-pass")
# UTF-8 name and a password with spaces and a character outside Latin-1
# (so RFC 2831's ISO-8859-1 folding cannot apply to it).
UNICODE = Account("ünicode", "pässwörd with spaces ✓")

# Cyrus SASL sasldb2 user; log in as user@realm.
CYRUS_REALM = "example.test"
CYRUS = Account(f"cyrususer@{CYRUS_REALM}", "cyrus-pass")
CYRUS_SHORT_NAME = "cyrususer"

DOVECOT_USERS = (NOTIFY, UNICODE)
