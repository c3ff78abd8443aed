"""Every header shape leaves the relay with exactly one From, the system address, as
the test Postfix reads it: its cleanup(8) logs each sender field as it splits the
header (header_checks WARN), and its delivered file is parsed too.

The messages go to `sysmail-relay serve` byte for byte (a raw SMTP client: smtplib
would turn bare CR and LF into CRLF before the relay sees them), and from the relay
to Postfix's plain listener. tests/rewrite/test_rewrite_shapes.py checks the same shapes
against Python's `email` parser.
"""

from __future__ import annotations

import email
import email.policy
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.peers.peers import MailPeers
from tests.rewrite_shapes import SHAPES
from tests.support import Daemon, free_port

from .operator import SYSTEM, Relay, start

pytestmark = pytest.mark.integration

_WARN = re.compile(r"warning: header (.*?) from \S+; from=<([^>]*)> to=<([^>]*)>.*: "
                   r"sender field (From|other)$", re.M)


def send_raw(port: int, data: bytes, rcpt: str) -> None:
    """One SMTP transaction that sends `data` exactly as it is (no line ending changed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while (line := reader.readline())[3:4] == b"-":
                pass
            return line

        assert reply().startswith(b"220")
        for command, code in ((b"EHLO app.example.com", b"250"),
                              (b"MAIL FROM:<app@a.example>", b"250"),
                              (b"RCPT TO:<" + rcpt.encode() + b">", b"250"), (b"DATA", b"354")):
            sock.sendall(command + b"\r\n")
            answer = reply()
            assert answer.startswith(code), (command, answer)
        end = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
        sock.sendall(data + end)
        answer = reply()
        assert answer.startswith(b"250"), answer
        sock.sendall(b"QUIT\r\n")


def test_every_header_shape_reaches_postfix_with_one_from_the_system_address(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}')
    tag = f"{time.time_ns():x}"  # this run's lines in the session's Postfix log
    for shape in SHAPES:
        send_raw(relay.daemon.port, shape.message, f"{shape.id}-{tag}@example.com")
    files = clean_peers.wait_for_messages(len(SHAPES), timeout=60)
    warnings: dict[str, list[tuple[str, str]]] = {}
    for field, mail_from, to, kind in _WARN.findall(clean_peers.log_text()):
        if to.endswith(f"-{tag}@example.com"):
            assert mail_from == SYSTEM
            warnings.setdefault(to.split("@")[0].removesuffix(f"-{tag}"), []).append(
                (kind, field))
    delivered = {}
    for path in files:
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        delivered[str(msg["Delivered-To"]).split("@")[0].removesuffix(f"-{tag}")] = msg
    for shape in SHAPES:
        (kind, field), *others = warnings.get(shape.id, [("none", "")])
        assert (kind, others) == ("From", []), (shape.id, warnings.get(shape.id))
        assert f"<{SYSTEM}>" in field or field == f"From: {SYSTEM}", (shape.id, field)
        msg = delivered[shape.id]
        (from_,) = msg.get_all("From") or []
        assert [a.addr_spec for a in from_.addresses] == [SYSTEM], shape.id
        assert msg["Return-Path"] == f"<{SYSTEM}>"


def test_held_mail_goes_to_postfix_with_the_address_set_before_activation(
        clean_peers: MailPeers, tmp_path: Path) -> None:
    # The seed's flow: Deactivate, mail is queued, the account is fixed, Activate (SIGHUP).
    old, new = "old-notify@old.example", "new-notify@new.example"
    state, config, port = tmp_path / "state", tmp_path / "relay.toml", free_port()

    def write(active: str, address: str) -> None:
        config.write_text(
            f'state_dir = "{state}"\n[listener]\nport = {port}\n[admin]\nport = 0\n'
            f'[system_account]\nactive = {active}\naddress = "{address}"\nserver = "up"\n'
            f'[servers.up]\nhost = "127.0.0.1"\nport = {clean_peers.port("plain")}\n')

    write("false", old)
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        tag = f"held-{time.time_ns():x}"
        send_raw(port, b"From: App <app@a.example>\r\nFrom: Director <dir@bank.example>\r\n"
                 b"Message-ID: <" + tag.encode() + b"@apps.example.com>\r\nSubject: approve\r\n"
                 b"\r\nPlease approve.\r\n", "boss@example.com")
        queued = state / "spool" / "queue"
        deadline = time.monotonic() + 10
        while not (queued.is_dir() and any(queued.iterdir())):
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.05)
        assert clean_peers.maildir_messages() == []  # held
        write("true", new)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        (delivered,) = clean_peers.find_messages(f"<{tag}@apps.example.com>", timeout=20)
    finally:
        daemon.stop(signal.SIGTERM)
    assert delivered["Return-Path"] == f"<{new}>"
    (from_,) = delivered.get_all("From") or []
    assert [(a.display_name, a.addr_spec) for a in from_.addresses] == [("App", new)]
    assert [a.addr_spec for a in delivered["Reply-To"].addresses] == ["app@a.example",
                                                                      "dir@bank.example"]
