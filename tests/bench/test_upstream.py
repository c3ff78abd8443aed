"""bench/upstream.py against the real Postfix and Dovecot: what T and X count is what
happened on the wire.

One upstream for the module (about 2 s to start): a client that logs in with AUTH PLAIN
after STARTTLS and sends two messages, then a second connection resuming the first's TLS
session; the upstream discards both messages and counts two sessions, two handshakes
(one resumed), two logins.
"""

from __future__ import annotations

import base64
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.upstream import ACCOUNT, HopCounts, TlsUpstream
from tests.peers.netutil import HOST
from tests.peers.peers import missing_binaries

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(missing_binaries()), reason="needs Postfix and Dovecot")]


@pytest.fixture(scope="module")
def upstream() -> Iterator[TlsUpstream]:
    directory = Path(tempfile.mkdtemp(prefix="bench-upstream-"))  # outside pytest's 0700 tree
    try:
        with TlsUpstream(directory / "up") as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Client:
    """Just enough SMTP over a socket to control the TLS session (smtplib cannot resume)."""

    def __init__(self, port: int, context: ssl.SSLContext,
                 session: ssl.SSLSession | None = None) -> None:
        self.sock: socket.socket = socket.create_connection((HOST, port), timeout=10)
        self.replies = self.sock.makefile("rb")
        self.expect(b"220")
        self.command(b"EHLO bench.example.com", b"250")
        self.command(b"STARTTLS", b"220")
        self.sock = context.wrap_socket(self.sock, server_hostname=HOST, session=session)
        self.replies = self.sock.makefile("rb")
        self.command(b"EHLO bench.example.com", b"250")

    def expect(self, code: bytes) -> bytes:
        while True:
            line = self.replies.readline()
            assert line.startswith(code), line
            if line[3:4] != b"-":
                return line

    def command(self, line: bytes, code: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def login(self) -> None:
        secret = f"\0{ACCOUNT.username}\0{ACCOUNT.password}".encode()
        self.command(b"AUTH PLAIN " + base64.b64encode(secret), b"235")

    def send(self, number: int) -> None:
        self.command(b"MAIL FROM:<notify@example.com>", b"250")
        self.command(b"RCPT TO:<user@example.com>", b"250")
        self.command(b"DATA", b"354")
        self.command(f"Subject: {number}\r\n\r\nbody\r\n.".encode(), b"250")

    def quit(self) -> ssl.SSLSession | None:
        self.command(b"QUIT", b"221")
        assert isinstance(self.sock, ssl.SSLSocket)
        session = self.sock.session
        self.sock.close()
        return session


def test_upstream_discards_and_counts_sessions_handshakes_resumption_and_logins(
        upstream: TlsUpstream) -> None:
    context = ssl.create_default_context(cafile=str(upstream.ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    first = Client(upstream.port, context)
    first.login()
    first.send(1)
    first.send(2)
    session = first.quit()
    assert session is not None
    second = Client(upstream.port, context, session)
    assert isinstance(second.sock, ssl.SSLSocket) and second.sock.session_reused
    second.login()
    second.quit()
    deadline = time.monotonic() + 10
    while upstream.received() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.received() == 2
    found = upstream.settled_counts()
    assert found == HopCounts(sessions=2, disconnected=2, tls_handshakes=2, tls_resumed=1,
                              starttls=2, auth=2, auth_refused=0, delivered=2,
                              queue_wait_mean_ms=found.queue_wait_mean_ms,
                              queue_wait_max_ms=found.queue_wait_max_ms)
    queue = upstream.directory / "postfix" / "queue"
    kept = [f for name in ("incoming", "active", "deferred", "hold")
            for f in (queue / name).rglob("*") if f.is_file()]
    assert kept == []  # discarded, not queued
