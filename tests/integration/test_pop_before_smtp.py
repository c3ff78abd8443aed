"""POP before SMTP against real Dovecot (POP3, STLS, POP3S, APOP) and a Postfix listener that
lets a client send only after a recent POP3 login from its address."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.peers import MailPeers
from tests.support import free_port, relay_command

from .operator import Relay, assert_relayed, message, start

pytestmark = pytest.mark.integration


def pop_block(peers: MailPeers, *, encryption: str = "none", apop: bool = False,
              port: int | None = None, password: str | None = None, extra: str = "") -> str:
    if port is None:
        port = peers.pop3s_port if encryption == "tls" else peers.pop3_port
    return (f"[servers.up.pop_before_smtp]\nhost = \"localhost\"\nport = {port}\n"
            f"encryption = \"{encryption}\"\napop = {str(apop).lower()}\n"
            f"username = \"{peers.notify.username}\"\n"
            f"password = \"{password or peers.notify.password}\"\ntimeout = 2\n{extra}")


def smtp_block(peers: MailPeers) -> str:
    return (f'host = "127.0.0.1"\nport = {peers.port("pop_before_smtp")}\n'
            f'ca_file = "{peers.ca_file}"\n')


def dovecot_logins(peers: MailPeers) -> list[str]:
    return [line for line in peers.dovecot_log_text().splitlines()
            if "Login: user=<notify>" in line and "pop3-login" in line]


@pytest.mark.parametrize(("encryption", "apop", "method", "tls"), [
    ("none", False, "PLAIN", False),
    ("none", True, "APOP", False),
    ("starttls", False, "PLAIN", True),
    ("tls", False, "PLAIN", True),
])
def test_delivered_after_a_pop_login(clean_peers: MailPeers, tmp_path: Path,
                                     relays: list[Relay], encryption: str, apop: bool,
                                     method: str, tls: bool) -> None:
    before = len(dovecot_logins(clean_peers))
    relay = start(relays, tmp_path, smtp_block(clean_peers)
                  + pop_block(clean_peers, encryption=encryption, apop=apop))
    tag = f"pop-{encryption}-{method.lower()}"
    relay.send(message(tag))
    assert_relayed(clean_peers, tag)
    (login,) = dovecot_logins(clean_peers)[before:]
    assert f"method={method}" in login
    assert (", TLS" in login) == tls, login


def test_without_the_pop_step_mail_waits_and_goes_out_after_reload(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, smtp_block(clean_peers))
    queue_id = relay.send(message("pop-missing"))
    env = relay.wait_envelope(queue_id, "queue", "5.7.1")
    assert "POP before SMTP" in env["last_reply"]
    assert clean_peers.maildir_messages() == []
    relay.config.write_text(relay.config.read_text() + pop_block(clean_peers))
    relay.daemon.send_signal(signal.SIGHUP)
    assert_relayed(clean_peers, "pop-missing")


def test_wait_delays_the_smtp_session(clean_peers: MailPeers, tmp_path: Path,
                                      relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, smtp_block(clean_peers)
                  + pop_block(clean_peers, extra="wait = 2\n"))
    accepted = time.monotonic()
    relay.send(message("pop-wait"))
    clean_peers.wait_for_messages(1, timeout=15)
    assert time.monotonic() - accepted >= 2.0
    login = clean_peers.last_pop_login()
    assert login is not None


def test_login_again_after_the_window_and_shared_while_fresh(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    before = len(dovecot_logins(clean_peers))
    relay = start(relays, tmp_path, smtp_block(clean_peers)
                  + pop_block(clean_peers, extra="window = 2\n"))
    for i in range(4):  # within the window: one login serves them all
        relay.send(message(f"pop-window-{i}"))
    clean_peers.wait_for_messages(4, timeout=15)
    assert len(dovecot_logins(clean_peers)) - before == 1
    time.sleep(2.5)
    relay.send(message("pop-window-late"))
    clean_peers.wait_for_messages(5, timeout=15)
    assert len(dovecot_logins(clean_peers)) - before == 2


def test_wrong_pop_password_is_deferred_with_the_servers_answer(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    secret = "Pop-Wrong-Secret-Marker"
    relay = start(relays, tmp_path, smtp_block(clean_peers)
                  + pop_block(clean_peers, password=secret))
    queue_id = relay.send(message("pop-wrong"))
    env = relay.wait_envelope(queue_id, "queue", "-ERR")
    assert "POP before SMTP" in env["last_reply"]
    for text in (relay.daemon.log_text(), relay.cli("status").stdout, str(env)):
        assert secret not in text


class StubPop3:
    """A POP3 server that greets without an APOP timestamp, or never answers."""

    def __init__(self, greeting: bytes | None) -> None:
        self.greeting = greeting
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.greeting is None:
                continue  # silent: the client must give up by itself
            conn.sendall(self.greeting)
            conn.settimeout(5)
            try:
                while data := conn.recv(1024):
                    self.received.append(data)
                    conn.sendall(b"-ERR no\r\n" if not data.startswith(b"QUIT")
                                 else b"+OK bye\r\n")
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def stub_factory() -> Iterator[type[StubPop3]]:
    stubs: list[StubPop3] = []

    class Tracked(StubPop3):
        def __init__(self, greeting: bytes | None) -> None:
            super().__init__(greeting)
            stubs.append(self)

    yield Tracked
    for stub in stubs:
        stub.close()


@pytest.mark.parametrize(("case", "expected"), [
    ("no timestamp", "no APOP timestamp"),
    ("silent", "timeout after 2 s"),
    ("down", "refused"),
])
def test_pop_failures_are_deferred_with_the_reason(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay],
        stub_factory: type[StubPop3], case: str, expected: str) -> None:
    if case == "down":
        port = free_port()
        stub = None
    else:
        stub = stub_factory(b"+OK POP3 ready\r\n" if case == "no timestamp" else None)
        port = stub.port
    relay = start(relays, tmp_path, smtp_block(clean_peers)
                  + pop_block(clean_peers, apop=True, port=port))
    queue_id = relay.send(message(f"pop-{case.replace(' ', '-')}"))
    relay.wait_envelope(queue_id, "queue", expected)
    if stub is not None:  # the password never went out in the clear as a fallback
        assert not any(b"PASS" in d or b"USER" in d for d in stub.received)


def test_check_connect_shows_pop_steps_before_smtp(clean_peers: MailPeers,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[system_account]\naddress = "n@example.com"\n'
                      f'server = "up"\n[servers.up]\n{smtp_block(clean_peers)}'
                      + pop_block(clean_peers, encryption="starttls", apop=True))
    result = subprocess.run([relay_command(), "check", "--connect", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if " ms " in line]
    first_smtp = next(i for i, line in enumerate(lines) if line.startswith("connect"))
    pop_steps = [line.split()[1] for line in lines[:first_smtp]]
    assert pop_steps[0] == "connect" and "STLS" in pop_steps and "APOP" in pop_steps
    assert clean_peers.notify.password not in result.stdout
