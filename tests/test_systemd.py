"""sd_notify over a real NOTIFY_SOCKET, and socket activation with a listening socket as fd 3."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from relay.systemd import Notifier, listen_sockets


def receiver(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
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


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[listener]\nport = {port}\n'
                      '[admin]\nport = 0\n')
    return config


def test_daemon_tells_systemd_ready_reloading_and_stopping(tmp_path: Path) -> None:
    """`serve` under Type=notify: READY=1 once listening, RELOADING=1 then READY=1 on SIGHUP,
    STOPPING=1 on SIGTERM."""
    from tests.support import free_port, relay_command

    sock = receiver(tmp_path)
    port = free_port()
    proc = subprocess.Popen([relay_command(), "serve", "--config", str(_config(tmp_path, port))],
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1") and f"MAINPID={proc.pid}" in ready
        assert "STATUS=0 queued" in ready
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it is listening
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096).startswith(b"RELOADING=1")
        assert sock.recv(4096).startswith(b"READY=1")
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_daemon_serves_on_a_socket_passed_by_systemd(tmp_path: Path) -> None:
    """Socket activation: the listening socket arrives as fd 3 with LISTEN_FDS=1 and
    LISTEN_PID of the daemon (set just before exec, which keeps the pid, as systemd does)."""
    from tests.support import relay_command

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    config = _config(tmp_path, 1)  # the configured port is not used: the passed socket is
    launcher = (  # what systemd does: the socket as fd 3, LISTEN_PID = the daemon's own pid
        "import os, sys\n"
        f"os.dup2({server.fileno()}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, relay_command(), "serve", "--config", str(config)],
        pass_fds=(server.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server.close()  # only the daemon holds it now
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    assert c.recv(512).startswith(b"220 ")
                break
            except (OSError, AssertionError):  # queued in the backlog before the daemon ran
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read() if proc.stderr else "") from None
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
