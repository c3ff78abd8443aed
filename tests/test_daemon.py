"""The installed `sysmail-relay` as an operator runs it: serve, signals, kill -9, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import subprocess
import threading
import time
from email import message_from_bytes
from email.utils import parseaddr
from pathlib import Path

import pytest

from relay.listener.cpus import worker_count
from tests.support import Daemon, free_port, relay_command

MESSAGE = (b"From: Workflow <workflow@apps.example.com>\r\nTo: boss@example.com\r\n"
           b"Subject: Approval request\r\nMessage-ID: <%s@apps.example.com>\r\n\r\n"
           b"Please approve request %s.\r\n")


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[listener]
port = {port}
[system_account]
address = "notify@example.com"
[queue]
retry_initial = "1s"
retry_max = "2s"
{extra}
""")
    return config


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    port = free_port()
    d = Daemon(write_config(tmp_path, port), tmp_path / "relay.log", port)
    d.start()
    yield d  # type: ignore[misc]
    if d.proc is not None and d.proc.poll() is None:
        d.stop(signal.SIGKILL)


def outbox(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "state" / "outbox" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def wait_for(predicate, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def run_cli(config: Path, *args: str,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    command = [relay_command(), "--config", str(config), *args]
    return subprocess.run(command, input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60)


def test_smtplib_and_swaks_deliver_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.sendmail("workflow@apps.example.com", ["boss@example.com"], MESSAGE % (b"1", b"1"))
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.fail("swaks is not installed: .ci/run installs it with apt-get")
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(daemon.port), "--from",
         "phone@apps.example.com", "--to", "desk@example.com", "--header",
         "Subject: Phone message", "--body", "Call back Mrs. Smith"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK queued as" in result.stdout
    wait_for(lambda: len(outbox(tmp_path)) == 2)
    for data in outbox(tmp_path):
        msg = message_from_bytes(data)
        assert msg["Return-Path"] == "<notify@example.com>"
        assert parseaddr(msg["From"])[1] == "notify@example.com"
    assert b"Call back Mrs. Smith" in b"".join(outbox(tmp_path))


def children(pid: int) -> list[int]:
    """The processes started by `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def test_sigterm_stops_cleanly_with_exit_0(daemon: Daemon) -> None:
    assert daemon.proc is not None
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.sendmail("workflow@apps.example.com", ["boss@example.com"], MESSAGE % (b"1", b"1"))
    # The intake workers and nothing else (the spool is written by their threads).
    kids = children(daemon.proc.pid)
    assert len(kids) == worker_count("auto")
    for kid in kids:
        assert b"relay.listener.worker" in Path(f"/proc/{kid}/cmdline").read_bytes()
    assert daemon.stop(signal.SIGTERM) == 0
    assert "stopped" in daemon.log_text()


def test_sighup_reloads_and_a_bad_file_keeps_the_running_configuration(
        daemon: Daemon, tmp_path: Path) -> None:
    daemon.config.write_text(daemon.config.read_text() + "\n[oops]\n")
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reload refused" in daemon.log_text())
    assert "oops: unknown key" in daemon.log_text()
    daemon.config.write_text(daemon.config.read_text().replace("[oops]", "")
                             .replace('"notify@example.com"', '"alerts@example.com"'))
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log_text())
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.sendmail("a@apps.example.com", ["b@example.com"], MESSAGE % (b"2", b"2"))
    wait_for(lambda: len(outbox(tmp_path)) == 1)
    assert outbox(tmp_path)[0].startswith(b"Return-Path: <alerts@example.com>")


def test_every_acknowledged_message_survives_kill_9(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(write_config(tmp_path, port), tmp_path / "relay.log", port)
    daemon.start()
    acknowledged: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            ident = f"{n}-{i}".encode()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                    smtp.sendmail("app@apps.example.com", ["user@example.com"],
                                  MESSAGE % (ident, ident))
            except (OSError, smtplib.SMTPException):
                return  # the relay died under us: this message was never acknowledged
            with lock:
                acknowledged.append(ident)
            i += 1

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acknowledged) >= 60)
        daemon.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(10)
        with lock:
            acked = set(acknowledged)
        daemon.start()
        spool = tmp_path / "state" / "spool"
        wait_for(lambda: not any(os.listdir(spool / d) for d in ("queue", "active")), timeout=60)
        delivered = [message_from_bytes(m)["Message-ID"] for m in outbox(tmp_path)]
        ids = {mid.strip("<>").split("@")[0].encode() for mid in delivered}
        lost = acked - ids
        assert not lost, f"{len(lost)} acknowledged messages lost: {sorted(lost)[:5]}"
        assert len(acked) >= 60
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


def test_unwritable_state_directory_stops_start_up_with_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{blocker / "state"}"\n[listener]\nport = {free_port()}\n')
    result = subprocess.run([relay_command(), "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot create state_dir" in result.stderr and str(blocker) in result.stderr


def test_status_works_without_the_daemon_and_shows_the_account(daemon: Daemon) -> None:
    daemon.stop()
    result = run_cli(daemon.config, "status")
    assert result.returncode == 0, result.stderr
    assert "System e-mail account details" in result.stdout
    assert "notify@example.com" in result.stdout and "not running" in result.stdout
    as_json = json.loads(run_cli(daemon.config, "status", "--json").stdout)
    assert as_json["account"]["system_email_account"] == "Active"
    assert as_json["queue"]["queued"] == 0


def test_send_test_reports_delivery(daemon: Daemon) -> None:
    result = run_cli(daemon.config, "send-test", "--to", "ops@example.com")
    assert result.returncode == 0, result.stderr
    assert "queued as" in result.stdout and ": delivered" in result.stdout


def test_send_test_without_a_daemon_exits_1_with_a_hint(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    result = run_cli(config, "send-test", "--to", "ops@example.com")
    assert result.returncode == 1
    assert "is `sysmail-relay serve` running?" in result.stderr


def test_sendmail_submits_from_stdin_with_recipients_from_headers(
        daemon: Daemon, tmp_path: Path) -> None:
    message = (b"To: Ops <ops@example.com>\nCc: dev@example.com\nBcc: audit@example.com\n"
               b"Subject: cron\n\nbackup done\n.\nafter the dot\n")
    result = run_cli(daemon.config, "sendmail", "-t", "-i", stdin=message)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(outbox(tmp_path)) == 1)
    data = outbox(tmp_path)[0]
    for rcpt in (b"ops@example.com", b"dev@example.com", b"audit@example.com"):
        assert b"Delivered-To: " + rcpt in data
    assert b"Bcc:" not in data and b"after the dot" in data


def test_sendmail_without_i_stops_at_a_lone_dot(daemon: Daemon, tmp_path: Path) -> None:
    result = run_cli(daemon.config, "sendmail", "ops@example.com",
                     stdin=b"Subject: x\n\nbefore\n.\nafter\n")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(outbox(tmp_path)) == 1)
    assert b"before" in outbox(tmp_path)[0] and b"after" not in outbox(tmp_path)[0]


def test_sendmail_exits_with_sysexits_codes(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    assert run_cli(config, "sendmail", "-X").returncode == 64  # EX_USAGE
    assert run_cli(config, "sendmail", stdin=b"Subject: x\n\nno rcpt\n").returncode == 64
    assert run_cli(config, "sendmail", "a@example.com", stdin=b"x\n").returncode == 75  # TEMPFAIL


def test_queue_commands_list_show_retry_delete(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port).read_text().replace(
        'address = "notify@example.com"', 'address = "notify@example.com"\nactive = false')
    (tmp_path / "relay.toml").write_text(config)
    daemon = Daemon(tmp_path / "relay.toml", tmp_path / "relay.log", port)
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as client:
            for i in (b"1", b"2"):
                client.sendmail("a@apps.example.com", ["b@example.com"], MESSAGE % (i, i))
        listing = json.loads(run_cli(daemon.config, "queue", "list", "--json").stdout)
        assert [row["state"] for row in listing] == ["held", "held"]  # inactive: held
        first, second = (row["id"] for row in listing)
        shown = json.loads(run_cli(daemon.config, "queue", "show", "--json", first).stdout)
        assert shown["recipients"][0]["address"] == "b@example.com"
        assert shown["subject"] == "Approval request"
        assert run_cli(daemon.config, "queue", "delete", second).returncode == 0
        assert run_cli(daemon.config, "queue", "show", second).returncode == 1
        assert run_cli(daemon.config, "queue", "retry", first).returncode == 0
        listing = json.loads(run_cli(daemon.config, "queue", "list", "--json").stdout)
        assert [row["id"] for row in listing] == [first]
        missing = run_cli(daemon.config, "queue", "retry", "0" * 21)
        assert missing.returncode == 1 and "no message" in missing.stderr
    finally:
        daemon.stop()


def test_help_is_useful_for_every_command() -> None:
    for args in (["--help"], ["serve", "--help"], ["queue", "retry", "--help"],
                 ["send-test", "--help"], ["check", "--help"]):
        result = subprocess.run([relay_command(), *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0 and len(result.stdout) > 200, args
    bad = subprocess.run([relay_command(), "frobnicate"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2


def test_json_logs_carry_the_queue_id(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, '[log]\nformat = "json"\nlevel = "info"')
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("a@apps.example.com", ["b@example.com"], MESSAGE % (b"j", b"j"))
        wait_for(lambda: len(outbox(tmp_path)) == 1)
        wait_for(lambda: "status=sent" in daemon.log_text())
    finally:
        daemon.stop()
    entries = [json.loads(line) for line in daemon.log_text().splitlines()]
    about_message = [e for e in entries if "queue_id" in e]
    assert {e["level"] for e in entries} <= {"info", "warning"}
    assert len(about_message) >= 2  # queued, sent
    assert len({e["queue_id"] for e in about_message}) == 1
    assert all(e["message"].startswith(e["queue_id"] + ": ") for e in about_message)


@pytest.mark.parametrize(("choice", "runs_on"), [("asyncio", "asyncio;"), ("uvloop", "uvloop 0.")])
def test_serve_runs_on_the_event_loop_it_is_given(
        tmp_path: Path, choice: str, runs_on: str) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    config.write_text(f'event_loop = "{choice}"\n' + config.read_text())
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    try:
        wait_for(lambda: "sysmail-relay started" in daemon.log_text())
        assert f"event loop {runs_on}" in daemon.log_text()
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("a@apps.example.com", ["b@example.com"], MESSAGE % (b"l", b"l"))
        wait_for(lambda: len(outbox(tmp_path)) == 1)
    finally:
        assert daemon.stop() == 0
    assert "stopped" in daemon.log_text()
