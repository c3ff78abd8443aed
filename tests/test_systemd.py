"""sd_notify over a real NOTIFY_SOCKET, and socket activation with a listening socket as fd 3."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from relay.systemd import Notifier, listen_sockets


def receiver(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    return sock


def test_notifier_sends_datagrams_to_notify_socket(tmp_path: Path) -> None:
    sock = receiver(tmp_path)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notifier.ready("queue 0")
    fields = sock.recv(4096).decode().split("\n")
    assert fields[0] == "READY=1" and "STATUS=queue 0" in fields
    assert notifier.reloading()
    assert sock.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert notifier.stopping() and sock.recv(4096) == b"STOPPING=1"
    notifier.close()
    sock.close()


def test_notifier_is_silent_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready("x")


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert Notifier({"WATCHDOG_USEC": "20000000"}).watchdog_interval == 10.0
    assert Notifier({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_listen_sockets_takes_fd_3_for_this_pid(tmp_path: Path) -> None:
    """A child started the way systemd does it: listening socket as fd 3, LISTEN_PID=self."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    code = (
        "import os, socket\n"
        "src = int(os.environ['SRC_FD'])\n"
        "if src != 3:\n"
        "    os.dup2(src, 3)\n"
        "    os.close(src)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "from relay.systemd import listen_sockets\n"
        "(s,) = listen_sockets()\n"
        "print(s.getsockname()[1], s.type == socket.SOCK_STREAM, 'LISTEN_FDS' in os.environ)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], pass_fds=(server.fileno(),),
        env={**os.environ, "LISTEN_FDS": "1", "SRC_FD": str(server.fileno())},
        capture_output=True, text=True, timeout=30)
    server.close()
    assert result.stdout.split() == [str(port), "True", "False"], result.stderr


def test_listen_sockets_ignores_another_pids_fds() -> None:
    assert listen_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
