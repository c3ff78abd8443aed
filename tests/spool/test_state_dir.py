"""The state directory belongs to one relay, and its files to the relay's user alone.

Run as the operator runs it (the installed `sysmail-relay`, a TOML file): a second
`serve` on the same state_dir exits 1 naming the first while a client sends, and
every message that got 250 is delivered; the lock goes with a killed holder;
`queue retry|delete` go through the running daemon; files and directories are
0600/0700 under umask 000; planted symbolic links (pid file, lock file, spool
entries) are never followed and their targets stay as they were.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.app import Relay
from relay.spool import files as spool_file
from relay.spool.state import StateLock
from relay.spool.store import Envelope, Recipient, new_queue_id
from tests.support import (
    Daemon,
    RelayFactory,
    daemon_config,
    free_port,
    relay_command,
    wait_until,
)


def run_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([relay_command(), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def delivered_ids(state: Path) -> set[str]:
    """The Message-ID local parts in the outbox."""
    new = state / "outbox" / "new"
    found = set()
    for path in new.iterdir() if new.is_dir() else []:
        m = re.search(rb"Message-ID: <([^@>]+)@", path.read_bytes())
        if m:
            found.add(m.group(1).decode())
    return found


def message(n: str) -> bytes:
    return (f"From: App <app@apps.example.com>\r\nTo: ops@example.com\r\nSubject: Alert {n}\r\n"
            f"Message-ID: <{n}@apps.example.com>\r\n\r\nDisk {n} is fine.\r\n").encode()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is killed at the end if it still runs."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def start(daemons: list[Daemon], config: Path, port: int, log: Path) -> Daemon:
    d = Daemon(config, log, port)
    daemons.append(d)
    d.start()
    return d


# --- item 4: one relay per state directory ---------------------------------------------------

class Sender(threading.Thread):
    """Sends messages one after the other; remembers those answered 250."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acknowledged: list[str] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                n = 0
                while not self.done.is_set():
                    name = f"m{n}"
                    client.sendmail("app@apps.example.com", ["ops@example.com"], message(name))
                    self.acknowledged.append(name)  # sendmail raises unless every 250 came
                    n += 1
        except BaseException as e:  # reported by the test
            self.error = e


def test_second_serve_exits_1_naming_the_first_and_every_250_is_delivered(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    port = free_port()
    first_config = daemon_config(tmp_path / "first.toml", state, port)
    first = start(daemons, first_config, port, tmp_path / "first.log")
    assert first.proc is not None
    sender = Sender(port)
    sender.start()
    wait_for(lambda: len(sender.acknowledged) >= 5)
    # Other ports on the same state directory, then the very same configuration.
    other = daemon_config(tmp_path / "second.toml", state, free_port())
    for config in (other, first_config):
        second = subprocess.run([relay_command(), "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1, second.stderr
        assert f"pid {first.proc.pid}" in second.stderr, second.stderr
        assert str(state) in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    sent_before_stop = len(sender.acknowledged)
    wait_for(lambda: len(sender.acknowledged) >= sent_before_stop + 5)
    sender.done.set()
    sender.join(30)
    assert sender.error is None, repr(sender.error)
    wait_for(lambda: set(sender.acknowledged) <= delivered_ids(state))
    assert os.listdir(state / "spool" / "quarantine") == []
    assert (state / "relay.pid").read_text() == f"{first.proc.pid}\n"
    status = run_cli(first_config, "status")
    assert f"running, pid {first.proc.pid}" in status.stdout, status.stdout
    assert first.proc.poll() is None
    assert first.stop() == 0
    assert not (state / "relay.pid").exists()


def test_lock_is_released_when_the_holder_is_killed_with_sigkill(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    port = free_port()
    config = daemon_config(tmp_path / "relay.toml", state, port)
    first = start(daemons, config, port, tmp_path / "first.log")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = start(daemons, config, port, tmp_path / "second.log")
    assert second.proc is not None
    assert (state / "relay.pid").read_text() == f"{second.proc.pid}\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@apps.example.com", ["ops@example.com"], message("after"))
    wait_for(lambda: "after" in delivered_ids(state))
    assert second.stop() == 0


def test_serve_waits_for_a_queue_command_that_holds_the_lock_then_starts(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    port = free_port()
    config = daemon_config(tmp_path / "relay.toml", state, port)
    command = StateLock(state)
    command.acquire("queue retry")  # as `queue retry` holds it while no daemon runs
    log = tmp_path / "relay.log"
    d = Daemon(config, log, port)
    daemons.append(d)
    with log.open("ab") as out:
        d.proc = subprocess.Popen([relay_command(), "serve", "--config", str(config)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(lambda: f"for sysmail-relay queue retry (pid {os.getpid()}) to finish"
                 in d.log_text())
        assert not (state / "spool").exists()  # nothing touched while it waits
    finally:
        command.release()
    wait_for(lambda: (state / "relay.pid").exists())
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@apps.example.com", ["ops@example.com"], message("after"))
    wait_for(lambda: "after" in delivered_ids(state))
    assert d.stop() == 0


def test_queue_retry_and_delete_while_the_daemon_runs_go_through_the_daemon(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    port = free_port()
    config = daemon_config(tmp_path / "relay.toml", state, port, active=False)
    d = start(daemons, config, port, tmp_path / "relay.log")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for n in ("a", "b", "c"):
            client.sendmail("app@apps.example.com", ["ops@example.com"], message(n))
    first, second, third = sorted(os.listdir(state / "spool" / "queue"))

    deleted = run_cli(config, "queue", "delete", first)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == f"{first}: deleted\n"
    retried = run_cli(config, "queue", "retry", second)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == f"{second}: due now\n"
    every = run_cli(config, "queue", "retry", "--all")
    assert every.returncode == 0 and every.stdout == "2 messages due now\n", every
    missing = run_cli(config, "queue", "delete", first)
    assert missing.returncode == 1 and "no message" in missing.stderr, missing
    log = d.log_text()
    assert f"{first}: deleted from the admin listener (command line)" in log
    assert f"{second}: made due now from the admin listener (command line)" in log
    assert "2 waiting messages made due now from the command line" in log
    assert sorted(os.listdir(state / "spool" / "queue")) == [second, third]
    assert os.listdir(state / "spool" / "edit") == []

    assert d.stop() == 0  # no daemon: the command takes the lock and changes the files
    alone = run_cli(config, "queue", "delete", third)
    assert alone.returncode == 0, alone.stderr
    assert "the daemon is not running" in alone.stdout
    assert os.listdir(state / "spool" / "queue") == [second]
    assert not (state / "relay.pid").exists()


# --- item 11: files ------------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def private_tree(state: Path) -> dict[str, str]:
    """Every file and directory under state_dir whose mode is not 0600/0700."""
    wrong = {}
    for root, dirs, files in os.walk(state):
        for name in dirs:
            if mode(Path(root, name)) != 0o700:
                wrong[os.path.join(root, name)] = oct(mode(Path(root, name)))
        for name in files:
            if mode(Path(root, name)) != 0o600:
                wrong[os.path.join(root, name)] = oct(mode(Path(root, name)))
    if mode(state) != 0o700:
        wrong[str(state)] = oct(mode(state))
    return wrong


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_serve_under_umask_000_makes_state_files_0600_and_directories_0700(
        tmp_path: Path, daemons: list[Daemon], umask_000: None) -> None:
    state = tmp_path / "deep" / "state"
    port = free_port()
    config = daemon_config(tmp_path / "relay.toml", state, port)
    d = start(daemons, config, port, tmp_path / "relay.log")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@apps.example.com", ["ops@example.com"], message("m"))
    wait_for(lambda: "m" in delivered_ids(state))
    assert private_tree(state) == {}
    assert mode(tmp_path / "deep") == 0o700
    assert d.stop() == 0


async def test_relay_in_process_under_umask_000_creates_only_private_files(
        relay_factory: RelayFactory, state_dir: Path, umask_000: None) -> None:
    """The modes are explicit: the relay as a library (no `serve`, whose umask is 077)."""
    relay: Relay = await relay_factory()
    relay.spool.store(Envelope(new_queue_id(), "app@apps.example.com",
                               [Recipient("ops@example.com")]), message("m"))
    await relay.rescan()
    await wait_until(lambda: "m" in delivered_ids(state_dir))
    assert private_tree(state_dir) == {}


def test_state_dir_may_be_a_symbolic_link_as_systemd_dynamic_user_makes_it(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    """/var/lib/NAME -> private/NAME: the operator's state_dir is followed, nothing in it."""
    (tmp_path / "private" / "state").mkdir(parents=True, mode=0o700)
    state = tmp_path / "state"
    state.symlink_to(Path("private") / "state")
    port = free_port()
    d = start(daemons, daemon_config(tmp_path / "relay.toml", state, port), port,
              tmp_path / "relay.log")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@apps.example.com", ["ops@example.com"], message("m"))
    wait_for(lambda: "m" in delivered_ids(tmp_path / "private" / "state"))
    assert (tmp_path / "private" / "state" / "relay.lock").is_file()
    assert d.stop() == 0


def test_planted_pid_file_symlink_is_replaced_not_followed(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (state / "relay.pid").symlink_to(victim)
    port = free_port()
    d = start(daemons, daemon_config(tmp_path / "relay.toml", state, port), port,
              tmp_path / "relay.log")
    assert d.proc is not None
    pid_file = state / "relay.pid"
    # The listener accepts before the daemon writes its pid file (once the admin
    # listener runs too): wait for the file, not for the port.
    wait_for(lambda: not pid_file.is_symlink() and pid_file.exists())
    assert victim.read_bytes() == b"precious\n"
    assert pid_file.read_text() == f"{d.proc.pid}\n"
    assert d.stop() == 0
    assert victim.read_bytes() == b"precious\n"


def test_planted_lock_file_symlink_stops_start_up_and_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (state / "relay.lock").symlink_to(victim)
    config = daemon_config(tmp_path / "relay.toml", state, free_port())
    result = subprocess.run([relay_command(), "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"cannot lock the state directory ({state / 'relay.lock'})" in result.stderr
    assert victim.read_bytes() == b"precious\n"
    assert not (state / "spool").exists()  # nothing else touched


SECRET = b"secret-line-that-must-never-leave\r\n"


def planted_entry(queue_id: str, directory: Path) -> Path:
    """A well-formed entry (envelope and message) at `directory`."""
    body = message(f"planted-{queue_id}")
    env = Envelope(queue_id, "app@apps.example.com", [Recipient("ops@example.com")],
                   size=len(body))
    directory.mkdir(mode=0o700)
    (directory / "envelope.json").write_bytes(env.to_json())
    (directory / "message").write_bytes(body)
    return directory


def planted_file(queue_id: str, path: Path) -> Path:
    """A well-formed entry of the current layout (one file: header, then the message)."""
    body = message(f"planted-{queue_id}")
    env = Envelope(queue_id, "app@apps.example.com", [Recipient("ops@example.com")],
                   size=len(body))
    path.write_bytes(spool_file.header(env.to_json()) + body)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("link", ["entry in queue", "entry in active", "message", "envelope",
                                  "file entry in queue", "saved envelope"])
def test_symlinked_spool_entry_is_quarantined_and_its_target_untouched(
        tmp_path: Path, daemons: list[Daemon], link: str) -> None:
    state = tmp_path / "state"
    port = free_port()
    config = daemon_config(tmp_path / "relay.toml", state, port, active=False)
    d = start(daemons, config, port, tmp_path / "relay.log")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@apps.example.com", ["ops@example.com"], message("good"))
    assert d.stop() == 0

    spool = state / "spool"
    queue_id = new_queue_id()
    outside = tmp_path / "outside"
    outside.mkdir()
    if link == "file entry in queue":
        target = planted_file(queue_id, outside / "entry")
        (spool / "queue" / queue_id).symlink_to(target)
        watched = [target]
    elif link == "saved envelope":
        entry = planted_file(queue_id, spool / "queue" / queue_id)
        target = outside / "envelope"
        env = Envelope(queue_id, "app@apps.example.com", [Recipient("ops@example.com")])
        target.write_bytes(env.to_json())
        (spool / "envelopes" / queue_id).symlink_to(target)
        watched = [target]
    elif link.startswith("entry"):
        target = planted_entry(queue_id, outside / "entry")
        place = link.rpartition(" ")[2]
        (spool / place / queue_id).symlink_to(target)
        watched = [target / "envelope.json", target / "message"]
    else:
        entry = planted_entry(queue_id, spool / "queue" / queue_id)
        name = "message" if link == "message" else "envelope.json"
        target = outside / name
        target.write_bytes(SECRET if link == "message" else (entry / name).read_bytes())
        (entry / name).unlink()
        (entry / name).symlink_to(target)
        watched = [target]
    before = {path: path.read_bytes() for path in watched}

    daemon_config(config, state, port, active=True)
    d = start(daemons, config, port, tmp_path / "relay2.log")
    wait_for(lambda: "good" in delivered_ids(state)
             and not os.listdir(spool / "queue") and not os.listdir(spool / "active"))
    assert d.stop() == 0

    assert {path: path.read_bytes() for path in watched} == before
    assert f"planted-{queue_id}" not in delivered_ids(state)
    for path in (state / "outbox" / "new").iterdir():
        assert SECRET not in path.read_bytes()
    (quarantined,) = [name for name in os.listdir(spool / "quarantine") if queue_id in name]
    reason = (spool / "quarantine" / quarantined / "REASON").read_text()
    assert "symbolic link" in reason, reason
    assert queue_id in d.log_text() and "moved to quarantine" in d.log_text()
