"""bench/ scenarios T and X: the files they write say what bench/README.md says.

Fast: nothing is started but `postconf`, `postmap` and `sysmail-relay check`, which read
the files as Postfix and the relay will.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bench import tls
from bench.nullclient import TlsHop
from bench.nullclient import configure as configure_null_client
from bench.relay_instance import RelayOptions, write_config
from bench.upstream import SUBMISSION, configure_postfix, count
from relay.settings import load_settings
from tests.peers import certs
from tests.peers.postfix_listeners import OAUTH_LISTENER, listeners, oauth_listener
from tests.peers.procutil import which
from tests.support import relay_command

pytestmark = pytest.mark.skipif(which("postconf") is None, reason="needs Postfix (postconf)")

UPSTREAM_PORT = 40587


def postconf(etc: Path, *args: str) -> str:
    return subprocess.run([cast(str, which("postconf")), "-c", str(etc), *args], check=True,
                          capture_output=True, text=True).stdout


def settings(etc: Path, *names: str) -> dict[str, str]:
    lines = postconf(etc, *names).splitlines()
    return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                for line in lines)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.PeerPKI:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


def test_null_client_for_t_requires_tls_logs_in_and_caches(tmp_path: Path,
                                                           pki: certs.PeerPKI) -> None:
    client = configure_null_client(tmp_path / "pf", UPSTREAM_PORT,
                                   TlsHop(pki.ca_file, "notify", "pass word"))
    etc = client.postfix.config_dir
    found = settings(etc, "smtp_tls_security_level", "smtp_tls_CAfile",
                     "smtp_sasl_auth_enable", "smtp_sasl_security_options",
                     "smtp_sasl_mechanism_filter", "smtp_connection_cache_on_demand",
                     "smtp_tls_session_cache_database", "smtp_tls_connection_reuse",
                     "smtp_sasl_password_maps", "relayhost")
    assert found == {
        "smtp_tls_security_level": "encrypt", "smtp_tls_CAfile": str(pki.ca_file),
        "smtp_sasl_auth_enable": "yes", "smtp_sasl_security_options": "noanonymous",
        "smtp_sasl_mechanism_filter": "plain", "smtp_connection_cache_on_demand": "yes",
        "smtp_tls_session_cache_database": f"btree:{tmp_path}/pf/data/smtp_scache",
        "smtp_tls_connection_reuse": "yes",
        "smtp_sasl_password_maps": f"texthash:{etc}/sasl_passwd",
        "relayhost": f"[127.0.0.1]:{UPSTREAM_PORT}"}
    # The login is found under the next hop as relayhost names it; only root reads it.
    looked_up = subprocess.run([cast(str, which("postmap")), "-c", str(etc), "-q",
                                f"[127.0.0.1]:{UPSTREAM_PORT}", found["smtp_sasl_password_maps"]],
                               capture_output=True, text=True, check=True).stdout
    assert looked_up.strip() == "notify:pass word"
    assert (etc / "sasl_passwd").stat().st_mode & 0o077 == 0
    assert "tlsproxy" in postconf(etc, "-M", "tlsproxy/unix")


def test_null_client_for_b_keeps_the_plain_hop(tmp_path: Path) -> None:
    etc = configure_null_client(tmp_path / "pf", UPSTREAM_PORT).postfix.config_dir
    assert settings(etc, "smtp_sasl_auth_enable", "smtp_tls_security_level") == {
        "smtp_sasl_auth_enable": "no", "smtp_tls_security_level": ""}
    assert not (etc / "sasl_passwd").exists()


def test_upstream_discards_and_wants_starttls_and_auth(tmp_path: Path,
                                                       pki: certs.PeerPKI) -> None:
    defined = [next(lsn for lsn in listeners(pki) if lsn.name == SUBMISSION),
               oauth_listener(pki, "oauth")]
    upstream = configure_postfix(tmp_path / "up", pki, tmp_path / "auth",
                                 defined, {SUBMISSION: 40001, OAUTH_LISTENER: 40002})
    etc = upstream.config_dir
    assert settings(etc, "default_transport", "mydestination", "smtpd_tls_loglevel",
                    "in_flow_delay") == {
        "default_transport": "discard:bench upstream", "mydestination": "",
        "smtpd_tls_loglevel": "1", "in_flow_delay": "0"}
    services = postconf(etc, "-P")
    for listener in ("127.0.0.1:40001", "127.0.0.1:40002"):
        assert f"{listener}/inet/smtpd_tls_security_level = encrypt" in services
        assert f"{listener}/inet/smtpd_tls_auth_only = yes" in services
    assert "127.0.0.1:40002/inet/smtpd_sasl_mechanism_filter = xoauth2,oauthbearer" in services


def relay_config(tmp_path: Path, options: RelayOptions) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, 40025, UPSTREAM_PORT, 40026, options)


def checked(config: Path) -> str:
    proc = subprocess.run([relay_command(), "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_relay_for_t_sends_with_starttls_and_auth_plain(tmp_path: Path,
                                                       pki: certs.PeerPKI) -> None:
    upstream: Any = SimpleNamespace(ca_file=pki.ca_file)
    server = tls.relay_server(upstream, tmp_path)
    config = relay_config(tmp_path / "relay", RelayOptions(server=server, pool_size=3))
    checked(config)
    sink = load_settings(config).servers["sink"]
    assert (sink.encryption, sink.ca_file, sink.pool_size) == ("starttls", pki.ca_file, 3)
    assert sink.auth is not None and sink.auth.method == "PLAIN"
    assert sink.auth.username == "notify"
    assert "s3cret-pass" not in config.read_text()  # the password is in a file, 0600
    assert (tmp_path / "password").stat().st_mode & 0o077 == 0


def test_relay_for_x_sends_with_xoauth2_from_the_test_provider(tmp_path: Path,
                                                              pki: certs.PeerPKI) -> None:
    upstream: Any = SimpleNamespace(ca_file=pki.ca_file)
    authority: Any = SimpleNamespace(url="http://127.0.0.1:40080")
    config = relay_config(tmp_path / "relay", tls.relay_oauth(upstream, authority, tmp_path))
    checked(config)
    loaded = load_settings(config)
    sink = loaded.servers["sink"]
    assert sink.encryption == "starttls" and sink.oauth is not None
    client = loaded.oauth_clients[sink.oauth.client]
    assert client.token_url == "http://127.0.0.1:40080/token"


SESSION_LOG = b"""\
x postfix/starttls_auth/smtpd[1]: connect from unknown[127.0.0.1]
x postfix/starttls_auth/smtpd[1]: Anonymous TLS connection established from unknown[127.0.0.1]: \
TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 \
server-signature ECDSA (prime256v1) server-digest SHA256
x postfix/discard[3]: 53F223282C1: to=<user@example.com>, relay=none, delay=0.01, \
delays=0.01/0.02/0/0, dsn=2.0.0, status=sent (bench upstream)
x postfix/discard[3]: 53F223282C2: to=<user@example.com>, relay=none, delay=0.01, \
delays=0.01/0/0/0, dsn=2.0.0, status=sent (bench upstream)
x postfix/starttls_auth/smtpd[1]: disconnect from unknown[127.0.0.1] ehlo=2 starttls=1 auth=1 \
mail=2 rcpt=2 data=2 quit=1 commands=11
x postfix/oauth/smtpd[2]: connect from unknown[127.0.0.1]
x postfix/oauth/smtpd[2]: Anonymous TLS connection established from unknown[127.0.0.1]: \
TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 \
server-signature ECDSA (prime256v1)
x postfix/oauth/smtpd[2]: disconnect from unknown[127.0.0.1] ehlo=2 starttls=1 auth=0/1 \
quit=1 commands=4/5
x postfix/oauth/smtpd[4]: connect from unknown[127.0.0.1]
"""


def test_upstream_log_counts_sessions_handshakes_resumptions_and_logins() -> None:
    found = count(SESSION_LOG)
    assert (found.sessions, found.disconnected, found.tls_handshakes, found.tls_resumed) == \
        (3, 2, 2, 1)
    assert (found.starttls, found.auth, found.auth_refused, found.delivered) == (2, 1, 1, 2)
    assert (found.queue_wait_mean_ms, found.queue_wait_max_ms) == (10.0, 20.0)
    assert found.figures(2)["auth_per_1000"] == 1000.0  # the refused exchange counts too
