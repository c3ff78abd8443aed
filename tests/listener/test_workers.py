"""Intake on every core (`listener.workers`): the installed `sysmail-relay serve` with
two intake processes, over real sockets.

Each worker accepts; a worker killed with SIGKILL is replaced and every message that
got a 250 is delivered; SIGTERM lets a transaction in flight finish; SIGHUP reaches
the workers with a session open, which carries on; max_connections holds for the
whole daemon; /metrics sums the workers' counters. And "auto" follows the CPU
affinity and the cgroup v2 quota.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import smtplib
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.errors import StateLocked
from relay.listener.cpus import MAX_AUTO, worker_count
from relay.spool.state import StateLock
from tests.support import Daemon, free_port

MESSAGE = b"From: App <app@example.com>\r\nSubject: n %d\r\n\r\nbody %d\r\n"
QUEUED = re.compile(r"relay\.listener\[(\d+)\]: ([0-9A-F]{21}): queued")


class Relay(Daemon):
    def scrape(self) -> dict[str, float]:
        found = re.search(r"admin listener on (http://[^/]+)/", self.log_text())
        assert found is not None
        with urllib.request.urlopen(f"{found[1]}/metrics", timeout=5) as r:
            text = r.read().decode()
        helps = re.findall(r"^# HELP (\S+)", text, re.M)
        assert len(helps) == len(set(helps)), "a metric family is exported twice"
        return {s.name + str(sorted(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def workers(self) -> list[int]:
        assert self.proc is not None
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if (int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid
                        and b"relay.listener.worker" in cmdline):
                    found.append(int(entry.name))
        return sorted(found)

    def outbox(self) -> set[str]:
        new = self.config.parent / "state" / "outbox" / "new"
        return {p.name.rsplit("_", 1)[1].split(".")[0] for p in new.iterdir()} \
            if new.is_dir() else set()


def wait_for(predicate: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def start(tmp_path: Path, listener: str = "") -> Relay:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[listener]
port = {port}
workers = 2
{listener}
[admin]
port = 0
[system_account]
address = "notify@example.com"
[queue]
retry_initial = "1s"
retry_max = "2s"
""")
    relay = Relay(config, tmp_path / "relay.log", port)
    relay.start()
    wait_for(lambda: "sysmail-relay started" in relay.log_text())
    assert len(relay.workers()) == 2
    return relay


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop(signal.SIGKILL)


def send(port: int, n: int) -> str:
    """One message on its own connection; its queue id from the 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("app.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        code, reply = client.data(MESSAGE % (n, n))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_each_worker_accepts_and_metrics_are_summed(tmp_path: Path,
                                                    relays: list[Relay]) -> None:
    relay = start(tmp_path)
    relays.append(relay)
    pids: set[str] = set()
    sent: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while len(pids) < 2:  # both take connections from the one socket
            assert len(sent) < 400, "one worker took every connection"
            sent += pool.map(lambda n: send(relay.port, n), range(len(sent), len(sent) + 16))
            pids = {m[1] for m in QUEUED.finditer(relay.log_text())}
    assert pids == {str(p) for p in relay.workers()}
    wait_for(lambda: relay.outbox() >= set(sent))
    metrics = relay.scrape()
    assert metrics["relay_messages_received_total[]"] == len(sent)
    assert metrics["relay_smtp_sessions[]"] == 0
    assert metrics["relay_messages_rejected_total[('reason', 'spool')]"] == 0
    assert metrics["relay_deliveries_total[('result', 'ok'), ('server', 'local')]"] == len(sent)


def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(
        tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(tmp_path)
    relays.append(relay)
    victim = relay.workers()[0]
    acknowledged: list[str] = []

    def client(first: int) -> None:
        for n in range(first, first + 40):
            # no 250: the client would send it again; not the relay's to keep
            with contextlib.suppress(smtplib.SMTPException, OSError, AssertionError):
                acknowledged.append(send(relay.port, n))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client, 1000 * i) for i in range(4)]
        wait_for(lambda: len(acknowledged) >= 10)
        os.kill(victim, signal.SIGKILL)
        for done in running:
            done.result()
    wait_for(lambda: len(relay.workers()) == 2 and victim not in relay.workers())
    assert re.search(rf"intake worker \d \(pid {victim}\) ended \(signal SIGKILL\)",
                     relay.log_text())
    wait_for(lambda: relay.outbox() >= set(acknowledged))
    assert send(relay.port, 9999)  # the replacement accepts
    assert relay.stop(signal.SIGTERM) == 0


def test_sigterm_lets_a_transaction_in_flight_finish(tmp_path: Path,
                                                      relays: list[Relay]) -> None:
    relay = start(tmp_path)
    relays.append(relay)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("app.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        client.putcmd("DATA")
        assert client.getreply()[0] == 354
        client.send(b"Subject: half\r\n\r\nthe first half, ")
        relay.send_signal(signal.SIGTERM)
        wait_for(refused)  # no new connections
        client.send(b"the second half\r\n.\r\n")
        code, reply = client.getreply()
        assert code == 250, reply
    assert relay.proc is not None and relay.proc.wait(30) == 0
    queue_id = reply.decode().rsplit(" ", 1)[1]
    spool = tmp_path / "state" / "spool" / "queue"
    assert queue_id in relay.outbox() or (spool / queue_id).exists()


def test_sighup_reaches_the_workers_and_an_open_session_carries_on(
        tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(tmp_path)
    relays.append(relay)

    def size() -> int:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("app.example.com")
            return int(client.esmtp_features["size"])

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as session:
        session.ehlo("app.example.com")
        session.mail("app@example.com")
        relay.config.write_text(relay.config.read_text().replace(
            "workers = 2", "workers = 2\nmax_message_size = 2000000"))
        relay.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in relay.log_text())
        for _ in range(8):  # whichever worker takes it
            wait_for(lambda: size() == 2000000)
        session.rcpt("user@example.com")
        code, reply = session.data(MESSAGE % (1, 1))
        assert code == 250, reply
    assert relay.stop(signal.SIGTERM) == 0


def test_max_connections_holds_across_workers(tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(tmp_path, "max_connections = 3")
    relays.append(relay)
    held = []
    for _ in range(3):
        conn = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        assert conn.recv(512).startswith(b"220")
        held.append(conn)
    for _ in range(4):  # whichever worker takes it: the daemon is full
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as extra:
            assert extra.recv(512).startswith(b"421 4.7.0")
    metrics = relay.scrape()
    assert metrics["relay_smtp_sessions[]"] == 3
    assert metrics["relay_messages_rejected_total[('reason', 'connections')]"] == 4
    held.pop().close()
    wait_for(lambda: relay.scrape()["relay_smtp_sessions[]"] == 2)
    assert send(relay.port, 1)
    for conn in held:
        conn.close()


def cgroup(tmp_path: Path, limits: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup with cpu.max files, and a /proc/self/cgroup naming a.slice/b."""
    root = tmp_path / "cgroup"
    for where, value in limits.items():
        (root / where).mkdir(parents=True, exist_ok=True)
        (root / where / "cpu.max").write_text(value + "\n")
    (root / "a.slice" / "b").mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/a.slice/b\n")
    return root, proc


def test_auto_workers_follow_affinity_and_the_cgroup_quota(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    root, proc = cgroup(tmp_path, {".": "max 100000", "a.slice/b": "max 100000"})
    assert worker_count("auto", root, proc) == min(cpus, MAX_AUTO)
    root, proc = cgroup(tmp_path / "1", {"a.slice/b": "150000 100000"})  # 1.5 CPUs
    assert worker_count("auto", root, proc) == min(cpus, 2)
    root, proc = cgroup(tmp_path / "2", {"a.slice": "50000 100000", "a.slice/b": "max 100000"})
    assert worker_count("auto", root, proc) == 1  # a parent's quota holds too
    assert worker_count(3, root, proc) == 3  # a number is taken as it is
    assert worker_count("auto", tmp_path / "none", tmp_path / "none") == min(cpus, MAX_AUTO)


def test_workers_left_by_a_killed_parent_finish_their_session_holding_the_lock(
        tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(tmp_path)
    relays.append(relay)
    orphans = relay.workers()
    state = tmp_path / "state"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("app.example.com")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        client.putcmd("DATA")
        assert client.getreply()[0] == 354
        client.send(b"Subject: orphan\r\n\r\nthe first half, ")
        assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(StateLocked):  # the spool is still in use: no recovery under it
            StateLock(state).acquire("test")
        client.send(b"the second half\r\n.\r\n")
        code, reply = client.getreply()
        assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in orphans))
    again = Relay(relay.config, tmp_path / "again.log", relay.port)
    relays.append(again)
    again.start()
    wait_for(lambda: queue_id in again.outbox())


def test_a_worker_that_keeps_dying_is_replaced_after_longer_pauses(
        tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(tmp_path)
    relays.append(relay)
    pauses = []

    def replaced(pid: int) -> Callable[[], bool]:
        return lambda: len(relay.workers()) == 2 and pid not in relay.workers()

    def logged() -> list[str]:
        return re.findall(r"ended \(signal SIGKILL\) after [\d.]+ s; starting another "
                          r"in ([\d.]+) s", relay.log_text())

    for killed in range(1, 4):
        victim = min(relay.workers())
        os.kill(victim, signal.SIGKILL)  # each soon after it started
        wait_for(replaced(victim))
        wait_for(lambda: len(logged()) >= killed)  # noqa: B023 (waited for at once)
        pauses = logged()
    assert [float(p) for p in pauses] == [0.5, 1.0, 2.0]
    assert send(relay.port, 1)
