"""Memory per session is a small buffer, whatever the size of the message it receives.

The installed `sysmail-relay serve`, with 100 clients each in the middle of a 20 MiB
DATA: everything they sent has been read by the daemon (nothing waits in the
kernel's socket queues), and the daemon's resident memory stays under a bound that
holding the messages in memory would exceed a dozen times over.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.support import Daemon, free_port

SESSIONS = 100
MESSAGE_BYTES = 20 << 20
RSS_BOUND_KIB = 150 << 10


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` and of every process it started."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if int(entry.name) == pid or parent == pid:
            total += next((int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmRSS:")), 0)
    return total


def queued_bytes(port: int) -> int:
    """Bytes sent to `port` on loopback that the daemon has not read yet (both ends'
    kernel queues: what clients still have to send, what the server has not read)."""
    shown = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} or "
                            f"dport = :{port} )"], capture_output=True, text=True, check=True)
    total = 0
    for line in shown.stdout.splitlines():
        recv_q, send_q = (int(x) for x in line.split()[:2])
        total += recv_q + send_q
    return total


def open_data(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    for command in (b"EHLO memory.example", b"MAIL FROM:<app@example.com>",
                    b"RCPT TO:<user@example.com>", b"DATA"):
        sock.sendall(command + b"\r\n")
        while (line := reader.readline())[3:4] == b"-":
            pass
        assert line[:1] in (b"2", b"3"), (command, line)
    return sock


def test_100_sessions_each_in_a_20_mib_data_stay_under_150_mib(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relay.toml"
    # One intake process: the bound is per process (each worker streams the same way).
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[listener]\nport = {port}\n'
                      'workers = 1\n[system_account]\nactive = false\n')
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    assert daemon.proc is not None
    line = b"m" * 1022 + b"\r\n"
    block = b"Subject: big\r\n\r\n" + line * ((1 << 20) // len(line))
    sockets: list[socket.socket] = []
    try:
        sockets = [open_data(port) for _ in range(SESSIONS)]
        before = rss_kib(daemon.proc.pid)

        def send(sock: socket.socket) -> None:
            for _ in range(-(-MESSAGE_BYTES // len(block))):  # at least MESSAGE_BYTES
                sock.sendall(block)

        senders = [threading.Thread(target=send, args=(s,)) for s in sockets]
        for t in senders:
            t.start()
        for t in senders:
            t.join(600)
        deadline = time.monotonic() + 120
        while queued_bytes(port):  # the daemon reads on until every byte is in
            assert time.monotonic() < deadline, f"{queued_bytes(port)} bytes still unread"
            time.sleep(0.2)
        holding = rss_kib(daemon.proc.pid)
        incoming = tmp_path / "state" / "spool" / "incoming"
        on_disk = sum(e.stat().st_size for e in incoming.iterdir())
        assert holding < RSS_BOUND_KIB, (
            f"RSS {holding / 1024:.0f} MiB with {SESSIONS} sessions in DATA "
            f"(before the data: {before / 1024:.0f} MiB)")
        assert on_disk > SESSIONS * (MESSAGE_BYTES - (1 << 20))  # written as it came
        print(f"RSS before the data {before / 1024:.1f} MiB, holding "
              f"{SESSIONS} x {MESSAGE_BYTES >> 20} MiB unfinished: {holding / 1024:.1f} MiB")
        for sock in sockets:  # every client gives up: nothing of theirs stays
            sock.close()
        sockets = []
        deadline = time.monotonic() + 60
        while os.listdir(incoming):
            assert time.monotonic() < deadline, os.listdir(incoming)[:3]
            time.sleep(0.1)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        for sock in sockets:
            sock.close()
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
