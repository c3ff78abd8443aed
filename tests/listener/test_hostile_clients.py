"""Slow and greedy clients, and clients from outside the allowed networks.

The daemon runs as an operator runs it. Clients from another address come from a
network namespace the test creates, joined to the host by a veth pair carrying the
test's own private addresses (no other host is involved).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Daemon, free_port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def start_daemon(tmp_path: Path, listener: str, host: str = "127.0.0.1",
                 event_loop: str = "asyncio") -> Daemon:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nevent_loop = "{event_loop}"\n'
                      f'[listener]\nport = {port}\nhost = "{host}"\n{listener}\n')
    daemon = Daemon(config, tmp_path / "relay.log", port, host)
    daemon.start()
    return daemon


def greeting(port: int, host: str = "127.0.0.1") -> str:
    with socket.create_connection((host, port), timeout=10) as s:
        return s.recv(512).decode(errors="replace")


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_slow_and_greedy_clients_get_421_memory_stays_bounded_and_service_resumes(
        tmp_path: Path, event_loop: str) -> None:
    daemon = start_daemon(tmp_path, "max_connections = 100\nidle_timeout = 10",
                          event_loop=event_loop)
    assert daemon.proc is not None
    before = rss_kib(daemon.proc.pid)
    hogs: list[socket.socket] = []
    try:
        greetings = []
        for _ in range(1000):  # ten times what the listener takes
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            greetings.append(s.recv(512).decode(errors="replace"))
            hogs.append(s)
        assert sum(g.startswith("220") for g in greetings) == 100
        assert sum(g.startswith("421 4.7.0") for g in greetings) == 900
        assert greeting(daemon.port).startswith("421 4.7.0")  # a clear answer, not a hang
        for second in range(4):  # slowloris: a byte now and then, never a whole line
            for s in hogs[:100]:
                with contextlib.suppress(OSError):
                    s.sendall(b"EHLO x"[second:second + 1])
            time.sleep(1)
        grown = rss_kib(daemon.proc.pid) - before
        assert grown < 64 * 1024, f"RSS grew by {grown} KiB with 100 slow clients"
        deadline = time.monotonic() + 30  # idle_timeout ends them: the listener is free again
        while not greeting(daemon.port).startswith("220"):
            assert time.monotonic() < deadline, "slow clients were never disconnected"
            time.sleep(0.5)
    finally:
        for s in hogs:
            s.close()
        daemon.stop()


@pytest.fixture
def outside_host() -> Iterator[tuple[str, str]]:
    """A network namespace 'outside' joined by veth: (host-side address, namespace name)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("needs root and iproute2 (CI runs as root and installs iproute2)")
    ns = f"sr{os.getpid() % 100000}"
    host_if, ns_if = f"{ns}h", f"{ns}n"
    subnet = 100 + os.getpid() % 150
    host_ip, ns_ip = f"10.254.{subnet}.1", f"10.254.{subnet}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield host_ip, ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_no_open_relay_for_a_client_outside_allowed_networks(
        tmp_path: Path, outside_host: tuple[str, str]) -> None:
    host_ip, ns = outside_host
    daemon = start_daemon(tmp_path, "", host=host_ip)
    try:
        client = (
            "import socket, sys\n"
            f"s = socket.create_connection(('{host_ip}', {daemon.port}), timeout=10)\n"
            "print(s.recv(512).decode())\n"
            "s.sendall(b'EHLO evil.example\\r\\n')\n"
            "try:\n"
            "    print(repr(s.recv(512)))\n"
            "except OSError as e:\n"
            "    print('closed', e)\n"
        )
        result = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", client],
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith("554 5.7.1"), result.stdout + result.stderr
        assert "allowed_networks" in result.stdout
        assert "250" not in result.stdout.split("\n", 1)[1]  # nothing after the refusal
        assert f"refused connection from {host_ip[:-1]}2" in daemon.log_text()
        assert list((tmp_path / "state" / "spool" / "queue").iterdir()) == []
    finally:
        daemon.stop()
