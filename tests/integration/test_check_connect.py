"""`sysmail-relay check --connect` says why it stops: every failing step prints one line
with the step, the server's reply or the local error, and the fix (the key to change).

Each test writes a TOML file and runs the installed command against a real server from
the test peers (Postfix listeners with and without STARTTLS, Cyrus SASL, Dovecot's POP3),
a TCP server that accepts and says nothing, one whose backlog is full (the TCP connect
itself times out), or a refused port.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers.peers import MailPeers
from tests.support import free_port, relay_command

from .operator import SYSTEM, auth_block

pytestmark = pytest.mark.integration


@dataclass
class Checked:
    code: int
    stdout: str
    stderr: str

    @property
    def failed_line(self) -> str:
        """The one line that says FAILED (there must be exactly one)."""
        failed = [line for line in self.stdout.splitlines() if "FAILED" in line]
        assert len(failed) == 1, self.stdout + self.stderr
        return failed[0]


def check_connect(tmp_path: Path, server: str, extra: str = "") -> Checked:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[system_account]\n'
                      f'address = "{SYSTEM}"\nserver = "up"\n[servers.up]\n{server}\n{extra}')
    result = subprocess.run([relay_command(), "check", "--connect", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return Checked(result.returncode, result.stdout, result.stderr)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listener that never accepts, its backlog filled: the kernel drops further SYNs,
    so a TCP connect to it times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        yield port
    finally:
        filler.close()
        server.close()


def test_auth_with_default_encryption_on_a_server_without_starttls_says_so_and_the_fix(
        clean_peers: MailPeers, tmp_path: Path) -> None:
    user = clean_peers.notify
    result = check_connect(tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}\n'
                           + auth_block("PLAIN", user.username, user.password))
    assert result.code == 1
    line = result.failed_line
    assert line.startswith("STARTTLS") and "does not offer STARTTLS" in line
    assert 'servers.up.encryption = "none"' in line and "465" in line and "587" in line
    assert result.stdout.rstrip().endswith(line)
    assert user.password not in result.stdout + result.stderr


def test_a_server_that_never_greets_is_no_greeting_not_a_connect_timeout(
        tmp_path: Path) -> None:
    with silent_server() as port:
        result = check_connect(tmp_path, f'host = "127.0.0.1"\nport = {port}\ntimeout = 1\n')
    assert result.code == 1
    line = result.failed_line
    assert "no greeting within 1 s" in line and "timeout after" not in line
    assert 'servers.up.encryption = "tls"' in line  # a port that waits for a TLS hello


def test_a_tcp_connect_that_times_out_says_timeout_connecting(tmp_path: Path) -> None:
    with full_backlog() as port:
        result = check_connect(tmp_path, f'host = "127.0.0.1"\nport = {port}\ntimeout = 1\n')
    assert result.code == 1
    line = result.failed_line
    assert line.startswith("connect") and "timeout after 1 s connecting" in line
    assert "no greeting" not in line and "servers.up.host" in line


def test_implicit_tls_on_a_silent_port_is_no_tls_handshake(tmp_path: Path) -> None:
    with silent_server() as port:
        result = check_connect(tmp_path, f'host = "127.0.0.1"\nport = {port}\ntimeout = 1\n'
                               'encryption = "tls"\n')
    line = result.failed_line
    assert result.code == 1 and "no TLS handshake within 1 s" in line
    assert "timeout after" not in line and "servers.up.port = 465" in line


def test_refused_port_names_host_and_port_keys(tmp_path: Path) -> None:
    result = check_connect(tmp_path, f'host = "127.0.0.1"\nport = {free_port()}\n')
    line = result.failed_line
    assert result.code == 1 and line.startswith("connect") and "refused" in line
    assert "servers.up.port" in line


def test_host_that_does_not_resolve_names_the_host_key(tmp_path: Path) -> None:
    result = check_connect(tmp_path, 'host = "no-such-host.invalid"\nport = 25\n')
    line = result.failed_line
    assert result.code == 1 and "does not resolve" in line and "servers.up.host" in line


def test_implicit_tls_on_a_plain_smtp_port_says_the_port_does_not_speak_tls(
        clean_peers: MailPeers, tmp_path: Path) -> None:
    result = check_connect(tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}\n'
                           'encryption = "tls"\ntimeout = 3\n')
    line = result.failed_line
    assert result.code == 1 and line.startswith("connect")
    assert "does not speak TLS" in line and "servers.up.port = 465" in line
    assert 'encryption = "starttls"' in line


def test_untrusted_certificate_points_at_ca_file(clean_peers: MailPeers,
                                                 tmp_path: Path) -> None:
    result = check_connect(tmp_path, f'host = "127.0.0.1"\n'
                           f'port = {clean_peers.port("starttls_untrusted")}\n'
                           'encryption = "starttls"\n')
    line = result.failed_line
    assert result.code == 1 and line.startswith("STARTTLS") and "not trusted" in line
    assert "servers.up.ca_file" in line


def test_certificate_for_another_name_points_at_host(clean_peers: MailPeers,
                                                     tmp_path: Path) -> None:
    result = check_connect(tmp_path, f'host = "localhost"\n'
                           f'port = {clean_peers.port("starttls_wrongname")}\n'
                           f'encryption = "starttls"\nca_file = "{clean_peers.ca_file}"\n')
    line = result.failed_line
    assert result.code == 1 and "not trusted" in line and "servers.up.host" in line


def test_auth_method_not_offered_names_the_offered_ones(clean_peers: MailPeers,
                                                        tmp_path: Path) -> None:
    user = clean_peers.notify  # this listener offers XOAUTH2 and OAUTHBEARER only
    result = check_connect(tmp_path, f'host = "localhost"\nport = {clean_peers.oauth_port}\n'
                           f'encryption = "starttls"\nca_file = "{clean_peers.ca_file}"\n'
                           + auth_block("PLAIN", user.username, user.password))
    line = result.failed_line
    assert result.code == 1 and line.startswith("AUTH PLAIN")
    assert "does not offer AUTH PLAIN; it offers" in line and "XOAUTH2" in line
    assert "[servers.up.oauth]" in line


def test_auth_offered_only_after_starttls_says_to_choose_starttls(clean_peers: MailPeers,
                                                                  tmp_path: Path) -> None:
    user = clean_peers.notify
    result = check_connect(tmp_path, f'host = "127.0.0.1"\n'
                           f'port = {clean_peers.port("starttls_auth")}\nencryption = "none"\n'
                           + auth_block("CRAM-MD5", user.username, user.password))
    line = result.failed_line
    assert result.code == 1 and line.startswith("AUTH CRAM-MD5")
    assert "it offers no authentication" in line
    assert 'servers.up.encryption = "starttls"' in line


def test_auth_refused_names_the_credentials_keys(clean_peers: MailPeers,
                                                 tmp_path: Path) -> None:
    user = clean_peers.notify
    result = check_connect(tmp_path, f'host = "127.0.0.1"\n'
                           f'port = {clean_peers.port("dovecot_auth")}\nencryption = "none"\n'
                           + auth_block("PLAIN", user.username, "not-the-password"))
    line = result.failed_line
    assert result.code == 1 and line.startswith("AUTH PLAIN") and "535" in line
    assert "servers.up.auth.username" in line and "not-the-password" not in result.stdout


def test_pop_before_smtp_refused_names_the_pop_keys(clean_peers: MailPeers,
                                                    tmp_path: Path) -> None:
    user = clean_peers.notify
    result = check_connect(
        tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("pop_before_smtp")}\n',
        f'[servers.up.pop_before_smtp]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'username = "{user.username}"\npassword = "{user.password}"\napop = true\n')
    line = result.failed_line
    assert result.code == 1 and line.startswith("POP connect")
    assert "servers.up.pop_before_smtp.host" in line


def test_pop_before_smtp_login_refused_names_the_pop_credentials(clean_peers: MailPeers,
                                                                 tmp_path: Path) -> None:
    user = clean_peers.notify
    result = check_connect(
        tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("pop_before_smtp")}\n',
        f'[servers.up.pop_before_smtp]\nhost = "127.0.0.1"\nport = {clean_peers.pop3_port}\n'
        f'username = "{user.username}"\npassword = "wrong-pop-password"\napop = true\n')
    line = result.failed_line
    assert result.code == 1 and line.startswith("POP APOP")
    assert "servers.up.pop_before_smtp.username" in line
    assert "wrong-pop-password" not in result.stdout
