"""Cyrus SASL for Postfix: a private sasldb2 and smtpd.conf (no saslauthd, no /etc)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers.procutil import chown, make_dir, require, write_file
from tests.peers.users import CYRUS_REALM, CYRUS_SHORT_NAME, Account

MECH_LIST = "PLAIN LOGIN CRAM-MD5 DIGEST-MD5"
APP_NAME = "smtpd"  # Postfix's smtpd_sasl_path: Cyrus reads <config_path>/smtpd.conf


@dataclass(frozen=True)
class CyrusSasl:
    config_dir: Path  # Postfix cyrus_sasl_config_path
    sasldb: Path
    realm: str


def configure(directory: Path, account: Account) -> CyrusSasl:
    """Create sasldb2 with one user in CYRUS_REALM and smtpd.conf under *directory*.

    *directory* must be where Postfix looks: see :func:`tests.peers.postfix.cyrus_config_dir`.
    """
    saslpasswd2 = require("saslpasswd2")
    make_dir(directory, 0o755)
    sasldb = directory / "sasldb2"
    subprocess.run(
        [saslpasswd2, "-c", "-p", "-f", str(sasldb), "-u", CYRUS_REALM, CYRUS_SHORT_NAME],
        input=account.password.encode("utf-8"),
        check=True,
        capture_output=True,
        timeout=10,
    )
    sasldb.chmod(0o640)
    chown(sasldb, "root", "postfix")  # smtpd runs as postfix and reads it
    write_file(
        directory / f"{APP_NAME}.conf",
        f"pwcheck_method: auxprop\n"
        f"auxprop_plugin: sasldb\n"
        f"sasldb_path: {sasldb}\n"
        f"mech_list: {MECH_LIST}\n",
    )
    return CyrusSasl(config_dir=directory, sasldb=sasldb, realm=CYRUS_REALM)
