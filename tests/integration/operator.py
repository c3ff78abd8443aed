"""The relay as an operator runs it (`sysmail-relay serve` and a TOML file), for tests
against real servers: start it, hand it a message, read its spool."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import smtplib
import socket
import subprocess
import threading
import time
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from relay.errors import DamagedEntry
from relay.spool.store import Spool
from tests.peers.peers import MailPeers
from tests.support import Daemon, free_port, relay_command

SYSTEM = "notify@example.com"


def message(tag: str, body: str = "Please approve request 42.\r\n") -> bytes:
    return (f"From: Workflow <workflow@apps.example.com>\r\nTo: boss@example.com\r\n"
            f"Subject: Approval {tag}\r\nMessage-ID: <{tag}@apps.example.com>\r\n\r\n"
            f"{body}").encode()


class Relay:
    """A running `sysmail-relay serve` with one [servers.up] block."""

    def __init__(self, tmp_path: Path, server: str, address: str = SYSTEM,
                 extra: str = "") -> None:
        self.state = tmp_path / "state"
        self.config = tmp_path / "relay.toml"
        port = free_port()
        self.config.write_text(
            f'state_dir = "{self.state}"\n[listener]\nport = {port}\n'
            f'[system_account]\naddress = "{address}"\nserver = "up"\n'
            f'[queue]\nretry_initial = "1s"\nretry_max = "2s"\n{extra}\n'
            f"[servers.up]\n{server}\n")
        self.daemon = Daemon(self.config, tmp_path / "relay.log", port)
        self.daemon.start()

    def send(self, data: bytes, rcpts: tuple[str, ...] = ("boss@example.com",)) -> str:
        with smtplib.SMTP("127.0.0.1", self.daemon.port) as client:
            client.ehlo("app.example.com")
            client.mail("workflow@apps.example.com")
            for rcpt in rcpts:
                client.rcpt(rcpt)
            code, text = client.data(data)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]

    def envelope(self, queue_id: str) -> tuple[str, dict[str, Any]] | None:
        spool = Spool(self.state / "spool")  # an entry is one file; its envelope may be
        for place in ("queue", "active", "dead"):  # saved beside it
            try:
                return place, dataclasses.asdict(spool.read(queue_id, place))
            except (FileNotFoundError, DamagedEntry):
                continue
        return None

    def wait_envelope(self, queue_id: str, place: str, reply_contains: str,
                      timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.envelope(queue_id)
            if found and found[0] == place and reply_contains in (
                    found[1].get("last_reply") or "") + (found[1].get("dead_reason") or ""):
                return found[1]
            time.sleep(0.1)
        raise AssertionError(f"{queue_id} not {place} with {reply_contains!r}: {found}\n"
                             + self.daemon.log_text())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([relay_command(), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.stop(signal.SIGTERM)


def start(relays: list[Relay], tmp_path: Path, server: str, **kw: Any) -> Relay:
    relay = Relay(tmp_path, server, **kw)
    relays.append(relay)
    return relay


def auth_block(method: str, user: str, password: str) -> str:
    return (f'[servers.up.auth]\nmethod = "{method}"\nusername = "{user}"\n'
            f'password = "{password}"\n')


def assert_relayed(peers: MailPeers, tag: str, sender: str = SYSTEM) -> None:
    (delivered,) = peers.find_messages(f"<{tag}@apps.example.com>")
    assert delivered["Return-Path"] == f"<{sender}>"
    assert parseaddr(delivered["From"]) == ("Workflow", sender)
    assert delivered["Reply-To"] == "Workflow <workflow@apps.example.com>"
    assert delivered.get_content() == "Please approve request 42.\n"




class RecordingProxy:
    """A TCP proxy on 127.0.0.1 in front of a server's port: it passes everything on and
    keeps each read from the client, so a test sees which commands arrived together,
    and both directions in the order it read them (`log`: from the client or not)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.log: list[tuple[bool, bytes]] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                self.log.append((from_client, data))  # before passing it on
                sink.sendall(data)
        except OSError:
            pass
        finally:  # ends the other direction too; each pump closes the socket it read
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            source.close()

    @property
    def reads(self) -> list[bytes]:
        """Each read from the client, in order."""
        return [data for from_client, data in list(self.log) if from_client]

    def close(self) -> None:
        self._server.close()
