"""`sysmail-sendmail` finds the running daemon's listener through the state directory
when the configuration names none (issue 20, item 8; relay.listener.submit_target).

The installed commands, as cron runs them: no `--config`, no `$RELAY_CONFIG`; the
daemon was started with `--config` on another port, or on a socket systemd passed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.listener.submit_target import listener_address
from relay.settings import DEFAULT_CONFIG_FILE, Settings
from relay.spool import state
from tests.support import Daemon, free_port, relay_command, stop_process

SYSMAIL_SENDMAIL = Path(sys.executable).parent / "sysmail-sendmail"
CRON_MAIL = "To: ops@example.com\nSubject: cron\n\nbackup done\n"


@pytest.fixture(autouse=True)
def _own_default_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's default state_dir is this test's ($XDG_STATE_HOME), and no system-wide
    configuration may stand in for the missing one."""
    if DEFAULT_CONFIG_FILE.exists():
        pytest.fail(f"{DEFAULT_CONFIG_FILE} exists on this host: these tests call the "
                    "commands without a configuration and would read it")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


def default_state(tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "sysmail-relay"


def outbox(state_dir: Path) -> list[bytes]:
    new = state_dir / "outbox" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def wait_for_outbox(state_dir: Path, count: int) -> list[bytes]:
    deadline = time.monotonic() + 20
    while len(found := outbox(state_dir)) < count:
        assert time.monotonic() < deadline, f"{count} messages did not reach the outbox"
        time.sleep(0.05)
    return found


def outbox_text(tmp_path: Path, count: int) -> str:
    return b"".join(wait_for_outbox(default_state(tmp_path), count)).decode(errors="replace")


def caller_env(**extra: str) -> dict[str, str]:
    """cron's environment: nothing of the relay's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RELAY_") and k != "STATE_DIRECTORY"}
    return {**env, **extra}


def run(*argv: str, stdin: str = CRON_MAIL, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, text=True, capture_output=True,
                          env=caller_env(**extra), timeout=60)


def wait_until_serving(state_dir: Path) -> state.Holder:
    deadline = time.monotonic() + 20
    while (holder := state.serving(state_dir)) is None or not holder.listener:
        assert time.monotonic() < deadline, "the lock file does not name the listener"
        time.sleep(0.05)
    return holder


@pytest.fixture
def daemon_on_its_own_port(tmp_path: Path) -> Iterator[Daemon]:
    """`serve --config /elsewhere/relay.toml` on a port of its own, state_dir the default."""
    port = free_port()
    config = tmp_path / "elsewhere" / "relay.toml"
    config.parent.mkdir()
    config.write_text(f'[listener]\nport = {port}\n[system_account]\n'
                      'address = "notify@example.com"\n[admin]\nport = 0\n')
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)


def test_sendmail_without_configuration_reaches_a_daemon_started_with_another(
        tmp_path: Path, daemon_on_its_own_port: Daemon) -> None:
    holder = wait_until_serving(default_state(tmp_path))
    assert holder.listener == f"127.0.0.1:{daemon_on_its_own_port.port}"
    dropin = run(str(SYSMAIL_SENDMAIL), "-t")
    assert dropin.returncode == 0, dropin.stderr
    command = run(relay_command(), "sendmail", "root@example.com")
    assert command.returncode == 0, command.stderr
    test = run(relay_command(), "send-test", "--to", "you@example.com", "--wait", "20",
               stdin="")
    assert test.returncode == 0, test.stdout + test.stderr
    assert f"127.0.0.1:{daemon_on_its_own_port.port}" in outbox_text(tmp_path, 3)
    messages = wait_for_outbox(default_state(tmp_path), 3)
    assert sum(b"Subject: cron" in m for m in messages) == 2


def test_a_listener_the_configuration_names_wins_over_the_running_daemons(
        tmp_path: Path, daemon_on_its_own_port: Daemon) -> None:
    wait_until_serving(default_state(tmp_path))
    elsewhere = free_port()
    named = run(str(SYSMAIL_SENDMAIL), "-t", RELAY_LISTENER__PORT=str(elsewhere))
    assert named.returncode == 75, named.stderr
    assert f"cannot reach the relay's listener at 127.0.0.1:{elsewhere}" in named.stderr
    assert outbox(default_state(tmp_path)) == []


@pytest.mark.parametrize(("bound", "dialled"), [(("0.0.0.0", 25), "127.0.0.1:25"),
                                                (("::", 2525), "[::1]:2525"),
                                                (("10.1.2.3", 2525), "10.1.2.3:2525")])
def test_the_lock_file_records_the_listener_as_a_local_client_dials_it(
        tmp_path: Path, bound: tuple[str, int], dialled: str) -> None:
    holder = state.Holder(42, state.SERVE, "http://127.0.0.1:8525", state.dialable(bound))
    assert holder.listener == dialled
    assert state.Holder.parse(holder.render()) == holder
    assert listener_of(holder) == (dialled.rpartition(":")[0].strip("[]"), bound[1])


def listener_of(holder: state.Holder) -> tuple[str, int]:
    """What `sendmail` dials for a daemon that holds this (a file lock held in this test)."""
    state_dir = Path(os.environ["XDG_STATE_HOME"]) / "held"
    state_dir.mkdir(parents=True)
    lock = state.StateLock(state_dir)
    lock.acquire(state.SERVE)
    try:
        lock.note(holder)
        return listener_address(Settings(state_dir=state_dir))
    finally:
        lock.release()


def test_a_lock_file_left_by_a_stopped_daemon_names_no_listener(
        tmp_path: Path, daemon_on_its_own_port: Daemon) -> None:
    state_dir = default_state(tmp_path)
    wait_until_serving(state_dir)
    assert daemon_on_its_own_port.stop() == 0
    left = (state_dir / state.LOCK_FILE).read_text()
    assert f"listener=127.0.0.1:{daemon_on_its_own_port.port}" in left  # never removed
    assert state.serving(state_dir) is None


def test_sendmail_reaches_a_daemon_on_a_socket_systemd_passed(tmp_path: Path) -> None:
    """relay.toml names no listener (socket activation binds it): the configuration's
    state directory says where the daemon listens."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    state_dir = tmp_path / "state"
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{state_dir}"\n[system_account]\n'
                      'address = "notify@example.com"\n[admin]\nport = 0\n')
    launcher = (  # what systemd does: the socket as fd 3, LISTEN_PID = the daemon's own pid
        "import os, sys\n"
        f"os.dup2({server.fileno()}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n")
    with (tmp_path / "relay.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, relay_command(), "serve", "--config", str(config)],
            pass_fds=(server.fileno(),), stdout=log, stderr=log)
    server.close()
    try:
        assert wait_until_serving(state_dir).listener == f"127.0.0.1:{port}"
        sent = run(str(SYSMAIL_SENDMAIL), "-t", RELAY_CONFIG=str(config))
        assert sent.returncode == 0, sent.stderr
        (message,) = wait_for_outbox(state_dir, 1)
        assert b"Subject: cron" in message
    finally:
        stop_process(proc)
