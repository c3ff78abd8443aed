"""`status`, `queue list|show`, /status, /metrics and the page say why mail waits.

The installed `sysmail-relay` against a daemon whose upstream is down (a port that
refuses), refuses the login, or waits for an OAuth sign-in (issue 20, items 3-6).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import smtplib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Daemon, free_port, relay_command
from tests.upstream_servers import Script, Servers

MESSAGE = (b"From: App <app@apps.example.com>\r\nTo: boss@example.com\r\n"
           b"Subject: Approval request\r\n\r\nPlease approve.\r\n")


def config(tmp_path: Path, port: int, admin: int, server: str = "", account: str = "",
           retry: str = "10m") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[listener]
port = {port}
[system_account]
address = "notify@example.com"
{'server = "system"' if server else ""}
{account}
[queue]
retry_initial = "{retry}"
retry_max = "{retry}"
[admin]
port = {admin}
{server}
""")
    return path


DOWN = """
[servers.system]
host = "127.0.0.1"
port = {upstream}
encryption = "none"
timeout = 2
"""


def cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([relay_command(), "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def http(admin: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not in /metrics")


def send(port: int, rcpts: tuple[str, ...] = ("boss@example.com",)) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("app@apps.example.com", list(rcpts), MESSAGE)


def wait_for_log(daemon: Daemon, text: str, count: int = 1, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while daemon.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log_text()}"
        time.sleep(0.05)


def visible(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def start(tmp_path: Path, **kwargs: str) -> tuple[Daemon, int]:
    """`serve`, and the port of its admin listener (the tests' environment gives it a free
    one: the lock file names it)."""
    port = free_port()
    daemon = Daemon(config(tmp_path, port, 0, **kwargs), tmp_path / "relay.log", port)
    daemon.start()
    lock = tmp_path / "state" / "relay.lock"
    deadline = time.monotonic() + 10
    while not (found := re.search(rb"admin=http://127.0.0.1:(\d+)", lock.read_bytes())):
        assert time.monotonic() < deadline, "the lock file does not name the admin listener"
        time.sleep(0.05)
    return daemon, int(found.group(1))


@pytest.fixture
def down(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """A daemon whose upstream refuses connections, with one message deferred."""
    daemon, admin = start(tmp_path, server=DOWN.format(upstream=free_port()))
    try:
        send(daemon.port)
        wait_for_log(daemon, "status=deferred")
        yield daemon, admin
    finally:
        daemon.stop(signal.SIGKILL)


def test_status_names_a_failing_server_its_error_next_attempt_and_last_success(
        down: tuple[Daemon, int]) -> None:
    daemon, _ = down
    shown = cli(daemon.config, "status")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "  system: failing" in out
    assert re.search(r"last error    \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  system .*refused the "
                     r"connection", out), out
    assert re.search(r"next attempt  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out), out
    assert "last success  never" in out
    assert "deferred 1" in out and "held 0" in out
    assert "Daemon: running" in out
    report = json.loads(cli(daemon.config, "status", "--json").stdout)
    (server,) = report["servers"]
    assert server["state"] == "failing" and server["held"] is False
    assert "refused the connection" in server["last_error"]
    assert server["last_error_at"] > 0 and server["next_attempt"] > server["last_error_at"]
    assert server["last_success"] is None
    assert report["queue"]["deferred"] == 1 and report["queue"]["held"] == 0
    assert report["daemon"]["source"].startswith("the running daemon (http://127.0.0.1:")


def test_status_page_and_metrics_show_the_upstream_down_while_readyz_stays_ready(
        down: tuple[Daemon, int]) -> None:
    _, admin = down
    code, body = http(admin, "/status")
    assert code == 200
    (server,) = json.loads(body)["servers"]
    assert server["state"] == "failing" and "refused the connection" in server["last_error"]
    assert http(admin, "/readyz") == (200, "ready\n")
    _, metrics = http(admin, "/metrics")
    assert metric(metrics, "relay_upstream_up", server="system") == 0
    _, page = http(admin, "/")
    text = visible(page)
    assert re.search(r"Upstream server Server State Last error Next attempt Last success "
                     r"system failing \d{4}-\d\d-\d\d [\d:]+ system .*refused the connection",
                     text), text


def test_queue_list_shows_columns_and_queue_show_a_readable_summary(
        down: tuple[Daemon, int]) -> None:
    daemon, _ = down
    listed = cli(daemon.config, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    heading, row = listed.stdout.splitlines()
    assert heading.split() == ["ID", "AGE", "STATE", "ATTEMPTS", "NEXT", "ATTEMPT", "LEFT",
                               "LAST", "REPLY"]
    queue_id, age, state, attempts, due, left, *reply = row.split()
    assert re.fullmatch(r"[0-9A-F]{21}", queue_id) and re.fullmatch(r"\d+s", age)
    assert (state, attempts, left) == ("deferred", "1", "1")
    assert re.fullmatch(r"\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d", due)
    assert "refused the connection" in " ".join(reply)
    rows = json.loads(cli(daemon.config, "queue", "list", "--json").stdout)
    assert rows[0]["id"] == queue_id and rows[0]["recipients"] == ["boss@example.com"]
    shown = cli(daemon.config, "queue", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert f"Message {queue_id}: waiting" in shown.stdout
    assert re.search(r"received      \d{4}-\d\d-\d\d \d\d:\d\d:\d\d from 127.0.0.1",
                     shown.stdout)
    assert "attempts      1" in shown.stdout and "subject       Approval request" in shown.stdout
    assert re.search(r"pending\s+<boss@example.com>\s+system .*refused", shown.stdout)
    as_json = json.loads(cli(daemon.config, "queue", "show", "--json", queue_id).stdout)
    assert as_json["attempts"] == 1 and as_json["recipients"][0]["state"] == "pending"


def test_mail_waiting_for_an_oauth_sign_in_is_held_everywhere(tmp_path: Path) -> None:
    oauth = DOWN.format(upstream=free_port()) + """
[servers.system.oauth]
client = "test"
[oauth_clients.test]
provider = "generic"
client_id = "relay"
client_secret = "s3cret-not-shown"
authorize_url = "http://127.0.0.1:9/authorize"
token_url = "http://127.0.0.1:9/token"
scopes = ["smtp"]
"""
    daemon, admin = start(tmp_path, server=oauth)
    try:
        send(daemon.port)
        wait_for_log(daemon, "Not granted")
        status = json.loads(cli(daemon.config, "status", "--json").stdout)
        assert status["servers"][0]["state"] == "not granted" and status["servers"][0]["held"]
        assert (status["queue"]["held"], status["queue"]["deferred"]) == (1, 0)
        assert "  system: not granted" in cli(daemon.config, "status").stdout
        _, metrics = http(admin, "/metrics")
        assert metric(metrics, "relay_queue_messages", state="held") == 1
        assert metric(metrics, "relay_queue_messages", state="deferred") == 0
        assert metric(metrics, "relay_upstream_up", server="system") == 0
        row = cli(daemon.config, "queue", "list").stdout.splitlines()[1]
        assert row.split()[2] == "held" and "held: not granted" in row
        assert "system not granted mail is held until this is fixed" in \
            visible(http(admin, "/")[1])
    finally:
        daemon.stop(signal.SIGKILL)


def test_mail_held_by_deactivate_is_listed_and_counted_as_held(tmp_path: Path) -> None:
    daemon, admin = start(tmp_path, account="active = false")
    try:
        send(daemon.port)
        row = cli(daemon.config, "queue", "list").stdout.splitlines()[1]
        assert row.split()[2] == "held" and "held: inactive" in row
        (listed,) = json.loads(cli(daemon.config, "queue", "list", "--json").stdout)
        assert (listed["state"], listed["held_reason"]) == ("held", "inactive")
        deadline = time.monotonic() + 10
        while (status := json.loads(cli(daemon.config, "status", "--json").stdout)
               )["queue"]["held"] != 1:
            assert time.monotonic() < deadline, status
        assert status["servers"][0]["state"] == "inactive"
        assert "Held Sending Dead Oldest waiting 0 0 1 0 0" in visible(http(admin, "/")[1])
    finally:
        daemon.stop(signal.SIGKILL)


async def test_logins_refused_three_times_pause_the_server_and_hold_the_mail(
        tmp_path: Path) -> None:
    servers = Servers()
    upstream = await servers.smtp(Script(password="right"))
    auth = DOWN.format(upstream=upstream) + """
[servers.system.auth]
method = "PLAIN"
username = "sys"
password = "wrong"
"""
    daemon, admin = await asyncio.to_thread(start, tmp_path, server=auth, retry="0.2s")
    try:
        await asyncio.to_thread(send, daemon.port)
        await asyncio.to_thread(wait_for_log, daemon, "authentication failures in a row")
        status = await asyncio.to_thread(cli, daemon.config, "status")
        assert re.search(r"  system: paused until \d\d:\d\d:\d\d\n", status.stdout), status.stdout
        assert "refused the login" in status.stdout and "held 1" in status.stdout
        report = json.loads((await asyncio.to_thread(cli, daemon.config, "status", "--json"))
                            .stdout)
        assert report["servers"][0]["state"] == "paused" and report["servers"][0]["held"]
        listed = await asyncio.to_thread(cli, daemon.config, "queue", "list")
        assert "held: paused" in listed.stdout
        _, metrics = await asyncio.to_thread(http, admin, "/metrics")
        assert metric(metrics, "relay_queue_messages", state="held") == 1
    finally:
        daemon.stop(signal.SIGKILL)
        await servers.close()


def test_status_says_the_daemon_does_not_run_and_what_it_cannot_know(tmp_path: Path) -> None:
    path = config(tmp_path, free_port(), free_port(), server=DOWN.format(upstream=free_port()))
    shown = cli(path, "status")
    assert shown.returncode == 0, shown.stderr
    assert "  system: unknown (the daemon is not running)" in shown.stdout
    assert "the daemon is not running: the servers' health is not known" in shown.stdout


async def test_a_dead_letter_lists_only_its_failed_recipients_with_its_real_attempts(
        tmp_path: Path) -> None:
    servers = Servers()
    upstream = await servers.smtp(Script(rcpt_replies={
        "nobody@example.com": ["550 5.1.1 no such user"]}))
    daemon, _ = await asyncio.to_thread(start, tmp_path,
                                        server=DOWN.format(upstream=upstream))
    try:
        await asyncio.to_thread(send, daemon.port, ("boss@example.com", "nobody@example.com"))
        await asyncio.to_thread(wait_for_log, daemon, "dead letter")
        (row,) = json.loads((await asyncio.to_thread(cli, daemon.config, "queue", "list",
                                                     "--json")).stdout)
        assert row["state"] == "dead" and row["attempts"] == 1
        assert row["recipients"] == ["nobody@example.com"]
        line = (await asyncio.to_thread(cli, daemon.config, "queue", "list")).stdout
        assert line.splitlines()[1].split()[2:6] == ["dead", "1", "-", "1"]
        shown = (await asyncio.to_thread(cli, daemon.config, "queue", "show", row["id"])).stdout
        assert "dead letter" in shown and "attempts      1" in shown
        assert re.search(r"delivered\s+<boss@example.com>", shown)
        assert re.search(r"failed\s+<nobody@example.com>\s+.*550 5.1.1 no such user", shown), shown
    finally:
        daemon.stop(signal.SIGKILL)
        await servers.close()


def test_quarantined_entries_are_listed_shown_counted_and_deleted(tmp_path: Path) -> None:
    queue_id = "661F28B623323369AAF25"
    damaged = tmp_path / "state" / "spool" / "queue" / queue_id
    damaged.mkdir(parents=True)
    (damaged / "envelope.json").write_text("{not json")
    (damaged / "message").write_text("Subject: x\r\n\r\nbody\r\n")
    daemon, admin = start(tmp_path)
    try:
        wait_for_log(daemon, f"{queue_id}: moved to quarantine")
        code, page = http(admin, "/")
        assert code == 200 and f"{queue_id} quarantined" in visible(page)
        listed = cli(daemon.config, "queue", "list").stdout.splitlines()
        assert listed[1].split()[:3] == [queue_id, "-", "quarantined"]
        (row,) = json.loads(cli(daemon.config, "queue", "list", "--json").stdout)
        assert row["state"] == "quarantined" and "envelope" in row["reason"]
        shown = cli(daemon.config, "queue", "show", queue_id)
        assert shown.returncode == 0, shown.stderr
        assert f"Message {queue_id}: quarantined" in shown.stdout
        assert row["reason"] in shown.stdout
        status = cli(daemon.config, "status")
        assert "1 in quarantine" in status.stdout
        assert json.loads(cli(daemon.config, "status", "--json").stdout
                          )["queue"]["quarantined"] == 1
        deleted = cli(daemon.config, "queue", "delete", queue_id)
        assert deleted.returncode == 0, deleted.stderr
        assert cli(daemon.config, "queue", "list").stdout.strip() == "the queue is empty"
    finally:
        daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize("breakage", ['timeout = "soon"', "timeout = = 2"],
                         ids=["invalid value", "not TOML"])
def test_status_and_queue_list_work_with_an_invalid_file_while_the_daemon_runs_the_old_one(
        tmp_path: Path, breakage: str) -> None:
    daemon, _ = start(tmp_path, server=DOWN.format(upstream=free_port()))
    try:
        send(daemon.port)
        wait_for_log(daemon, "status=deferred")
        good = daemon.config.read_text()
        daemon.config.write_text(good.replace("timeout = 2", breakage))
        daemon.send_signal(signal.SIGHUP)
        wait_for_log(daemon, "configuration reload refused")
        shown = cli(daemon.config, "status")
        assert shown.returncode == 0, shown.stderr
        first = shown.stdout.splitlines()[0]
        assert first.startswith(f"Warning: the configuration file {daemon.config} is invalid")
        assert "still runs the configuration it loaded before" in first
        assert "sysmail-relay: warning: the configuration file" in shown.stderr
        assert "  system: failing" in shown.stdout and "deferred 1" in shown.stdout
        as_json = cli(daemon.config, "status", "--json")
        assert as_json.returncode == 0, as_json.stderr
        report = json.loads(as_json.stdout)
        assert "is invalid" in report["configuration_file_invalid"]
        assert report["servers"][0]["state"] == "failing"
        listed = cli(daemon.config, "queue", "list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stderr.startswith("sysmail-relay: warning: the configuration file")
        assert listed.stdout.splitlines()[1].split()[2] == "deferred"
    finally:
        daemon.stop(signal.SIGKILL)
