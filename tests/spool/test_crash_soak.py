"""Crash soak: load, kill -9 at random moments, and an upstream that misbehaves.

Several client threads hand messages to `sysmail-relay serve` (a TOML file, as an
operator runs it) with smtplib, each with a unique Message-ID, and note which
ones got 250. Meanwhile the relay is SIGKILLed at random moments and started
again, and the upstream (tests/faulty_upstream.py, a process of its own that
survives the kills) randomly answers 4xx, hangs up in the middle of DATA, stalls
past the relay's one-second timeout, or takes a message but answers too late.
At the end the faults are switched off, the relay runs without kills until its
queue is empty, and the figures are counted from the upstream's journal:

    acknowledged   Message-IDs the relay answered 250 to
    delivered      distinct Message-IDs the upstream took
    duplicates     takes beyond the first of a Message-ID (at-least-once delivery)
    lost           acknowledged but never delivered: must be 0

The short version runs here (about 5 kills); the long one is `scripts/soak`
(`python -m tests.spool.test_crash_soak --kills 20`), which prints the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from relay.spool.store import Spool
from tests.faulty_upstream import FAULTS, body_digest
from tests.support import Daemon, free_port

MESSAGE = ("From: Workflow <workflow@apps.example.com>\r\nTo: boss@example.com\r\n"
           "Subject: Approval request {n}\r\nMessage-ID: {mid}\r\n\r\n"
           "Please approve request {n}.\r\n" + "Lorem ipsum dolor sit amet.\r\n" * 20)


@dataclass
class SoakResult:
    kills: int = 0
    seconds_under_load: float = 0.0
    clients: int = 0
    attempted: int = 0
    acknowledged: int = 0
    not_acknowledged: dict[str, int] = field(default_factory=dict)
    """Attempts that got no 250, by why: the relay was down, or was killed mid-session."""
    delivered: int = 0
    deliveries: int = 0
    """Every take by the upstream, duplicates included."""
    duplicates: int = 0
    corrupted: int = 0
    """Takes whose body differs from what the client sent."""
    delivered_unacknowledged: int = 0
    """Delivered although the client never saw 250 (killed between fsync and reply)."""
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    dead: int = 0
    quarantined: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    recovered_in_flight: int = 0
    """Messages put back into the queue by start-up recovery, summed over restarts."""
    drain_seconds: float = 0.0
    tracebacks: int = 0
    seed: int = 0

    def table(self) -> str:
        rows = [
            ("seed", self.seed),
            ("kills (SIGKILL, then restart)", self.kills),
            ("clients", self.clients),
            ("seconds under load", f"{self.seconds_under_load:.0f}"),
            ("messages attempted", self.attempted),
            ("acknowledged with 250", self.acknowledged),
            ("not acknowledged", sum(self.not_acknowledged.values())),
            *((f"  {why}", n) for why, n in sorted(self.not_acknowledged.items())),
            ("faults injected by the upstream", sum(self.faults.values())),
            *((f"  {kind}", n) for kind, n in sorted(self.faults.items())),
            ("in flight at a kill, put back by recovery", self.recovered_in_flight),
            ("delivered (distinct Message-IDs)", self.delivered),
            ("upstream takes in all", self.deliveries),
            ("duplicates", self.duplicates),
            ("corrupted bodies", self.corrupted),
            ("delivered though never acknowledged", self.delivered_unacknowledged),
            ("dead letters", self.dead),
            ("quarantined", self.quarantined),
            ("tracebacks in the relay's log", self.tracebacks),
            ("drain after the last kill (s)", f"{self.drain_seconds:.1f}"),
            ("LOST (acknowledged, not delivered)", self.lost),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class Upstream:
    """tests/faulty_upstream.py as a child process."""

    def __init__(self, journal: Path, fault_rate: float, stall: float, seed: int,
                 kinds: str = ",".join(FAULTS)) -> None:
        self.journal = journal
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faulty_upstream", "--journal", str(journal),
             "--fault-rate", str(fault_rate), "--stall", str(stall), "--seed", str(seed),
             "--faults", kinds],
            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), f"faulty upstream did not start: {line!r}"
        self.port = int(line.split()[1])

    def faults_off(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def read(self) -> tuple[Counter[str], Counter[str], list[tuple[str, str]]]:
        """(takes per Message-ID, faults per kind, (Message-ID, body digest) per take)."""
        accepted: Counter[str] = Counter()
        faults: Counter[str] = Counter()
        bodies: list[tuple[str, str]] = []
        for line in self.journal.read_text().splitlines():
            kind, _, value = line.partition(" ")
            if kind == "accepted":
                mid, _, digest = value.partition(" ")
                accepted[mid] += 1
                bodies.append((mid, digest))
            elif kind == "fault":
                faults[value] += 1
        return accepted, faults, bodies


def write_config(workdir: Path, port: int, upstream_port: int) -> Path:
    """The relay's TOML file: one SMTP server with a one-second timeout, quick retries."""
    config = workdir / "relay.toml"
    config.write_text(f"""\
state_dir = "{workdir / 'state'}"

[listener]
port = {port}

[system_account]
address = "notify@example.com"
server = "flaky"

[servers.flaky]
host = "127.0.0.1"
port = {upstream_port}
encryption = "none"
timeout = 1
pool_size = 4

[queue]
retry_initial = "0.5s"
retry_max = "4s"

[admin]
port = 0
""")
    return config


class Clients:
    """Threads sending with smtplib, each message with a unique Message-ID."""

    def __init__(self, port: int, count: int, pause: float) -> None:
        self.port = port
        self.pause = pause
        self.acked: set[str] = set()
        self.sent: dict[str, str] = {}
        """Message-ID -> digest of the body sent (acknowledged or not)."""
        self.attempted = 0
        self.failed: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(count)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, n: int) -> None:
        rng = random.Random()
        i = 0
        while not self.stop.is_set():
            i += 1
            mid = f"<soak-{n}-{i}-{rng.getrandbits(32):08x}@apps.example.com>"
            with self.lock:
                self.attempted += 1
            acked = False
            data = MESSAGE.format(n=f"{n}-{i}", mid=mid).encode()
            with self.lock:
                self.sent[mid] = body_digest(data)
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                    smtp.sendmail("workflow@apps.example.com", ["boss@example.com"], data)
                    acked = True  # 250 after DATA: what happens at QUIT does not matter
                    with self.lock:
                        self.acked.add(mid)
            except (OSError, smtplib.SMTPException) as e:
                if not acked:
                    with self.lock:
                        self.failed[_why(e)] += 1
                    time.sleep(0.05)  # the relay is down or was killed mid-session
                    continue
            time.sleep(rng.uniform(0, self.pause))


def _why(error: Exception) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (relay down)"
    if isinstance(error, smtplib.SMTPResponseException) and error.smtp_code >= 400:
        return f"answered {error.smtp_code}"
    return "cut off mid-session (relay killed)"


def _spool_busy(state: Path) -> bool:
    spool = state / "spool"
    return any(os.listdir(spool / d) for d in ("queue", "active", "incoming", "edit"))


def soak(workdir: Path, *, kills: int, clients: int = 4, min_up: float = 0.5,
         max_up: float = 3.0, fault_rate: float = 0.4, pause: float = 0.2,
         drain_timeout: float = 180.0, seed: int | None = None,
         faults: str = ",".join(FAULTS),
         say: Callable[[str], None] = lambda _: None) -> SoakResult:
    seed = seed if seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    result = SoakResult(kills=0, clients=clients, seed=seed)
    workdir.mkdir(parents=True, exist_ok=True)
    upstream = Upstream(workdir / "upstream.journal", fault_rate, stall=3.0, seed=seed,
                        kinds=faults)
    port = free_port()
    daemon = Daemon(write_config(workdir, port, upstream.port), workdir / "relay.log", port)
    load = Clients(port, clients, pause)
    try:
        daemon.start()
        load.start()
        started = time.monotonic()
        for k in range(kills):
            time.sleep(rng.uniform(min_up, max_up))
            daemon.stop(signal.SIGKILL)
            result.kills += 1
            time.sleep(rng.uniform(0, 0.3))  # down for a moment: clients get refused
            daemon.start()
            say(f"kill {k + 1}/{kills}: {len(load.acked)} acknowledged so far")
        time.sleep(rng.uniform(min_up, max_up))
        load.join()
        result.seconds_under_load = time.monotonic() - started
        upstream.faults_off()
        drain_started = time.monotonic()
        while True:  # until nothing is left to send (dead letters included)
            if not _spool_busy(workdir / "state"):
                break
            if time.monotonic() - drain_started > drain_timeout:
                say("drain timed out")
                break
            time.sleep(0.2)
        result.drain_seconds = time.monotonic() - drain_started
        assert daemon.stop(signal.SIGTERM) == 0, "serve did not stop cleanly"
    finally:
        load.stop.set()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
        upstream.stop()
    accepted, injected, bodies = upstream.read()
    acked = set(load.acked)
    result.attempted = load.attempted
    result.acknowledged = len(acked)
    result.not_acknowledged = dict(load.failed)
    result.delivered = len(accepted)
    result.deliveries = sum(accepted.values())
    result.duplicates = result.deliveries - result.delivered
    result.corrupted = sum(1 for mid, digest in bodies if load.sent.get(mid) != digest)
    result.delivered_unacknowledged = len(accepted.keys() - acked)
    lost = sorted(acked - accepted.keys())
    result.lost = len(lost)
    result.lost_ids = lost[:20]
    result.faults = dict(injected)
    spool = workdir / "state" / "spool"
    result.dead = len(os.listdir(spool / "dead"))
    result.quarantined = len(os.listdir(spool / "quarantine"))
    log = daemon.log_text()
    result.tracebacks = log.count("Traceback")
    result.recovered_in_flight = sum(
        int(m) for m in re.findall(r"spool recovered: (\d+) put back", log))
    return result


# --- the CI version ------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_crash_soak_loses_no_acknowledged_message(tmp_path: Path) -> None:
    kills = int(os.environ.get("SYSMAIL_SOAK_KILLS", "5"))
    result = soak(tmp_path / "soak", kills=kills, clients=4, min_up=0.5, max_up=3.0)
    print("\n" + result.table())
    assert result.kills == kills
    assert result.acknowledged >= 50, "too little load to show anything"
    assert sum(result.faults.values()) >= 10, "the upstream injected too few faults"
    assert result.lost == 0, f"acknowledged but not delivered: {result.lost_ids}"
    assert result.corrupted == 0
    assert result.dead == 0 and result.quarantined == 0
    assert result.tracebacks == 0, (tmp_path / "soak" / "relay.log").read_text()[-4000:]


@pytest.mark.timeout(120)
def test_restarts_during_an_upstream_outage_do_not_bury_good_messages(tmp_path: Path) -> None:
    """The upstream takes DATA and never answers (an outage where every attempt runs into
    the timeout) while the relay is restarted five times (deploys, a node drain, a crash
    loop elsewhere). The messages in flight at each kill did not cause the kills: once
    the upstream is back, every one of them must be delivered, none made a dead letter
    "interrupted 5 times"."""
    upstream = Upstream(tmp_path / "upstream.journal", fault_rate=1.0, stall=60.0, seed=1,
                        kinds="stall-data")
    port = free_port()
    config = write_config(tmp_path, port, upstream.port)
    config.write_text(config.read_text().replace("timeout = 1\n", "timeout = 10\n")
                      .replace("pool_size = 4", "pool_size = 2"))
    daemon = Daemon(config, tmp_path / "relay.log", port)
    sent = [f"<outage-{i}@apps.example.com>" for i in range(6)]
    try:
        daemon.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            for n, mid in enumerate(sent):
                smtp.sendmail("workflow@apps.example.com", ["boss@example.com"],
                              MESSAGE.format(n=n, mid=mid).encode())
        seen = 0
        for restart in range(5):
            if restart:
                daemon.start()
            deadline = time.monotonic() + 20
            while upstream.read()[1]["stall-data"] < seen + 2:  # both connections sending
                assert time.monotonic() < deadline, "no delivery in flight"
                time.sleep(0.02)
            time.sleep(0.2)  # the message is on the wire; the upstream says nothing
            daemon.stop(signal.SIGKILL)
            seen = upstream.read()[1]["stall-data"]
        upstream.faults_off()  # the outage ends
        daemon.start()
        deadline = time.monotonic() + 30
        while _spool_busy(tmp_path / "state") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
        upstream.stop()
    dead = sorted(os.listdir(tmp_path / "state" / "spool" / "dead"))
    spool = Spool(tmp_path / "state" / "spool")
    reasons = [spool.read(d, "dead").dead_reason for d in dead]
    delivered = upstream.read()[0]
    assert sorted(delivered) == sorted(sent), f"dead letters: {reasons}"


# --- the long version: scripts/soak --------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/soak",
        description="Crash soak of sysmail-relay: load, random kill -9, a faulty upstream; "
                    "prints acknowledged / delivered / duplicates / lost.")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--min-up", type=float, default=0.5,
                        help="shortest run between kills, seconds (default 0.5)")
    parser.add_argument("--max-up", type=float, default=3.0,
                        help="longest run between kills, seconds (default 3)")
    parser.add_argument("--fault-rate", type=float, default=0.4,
                        help="share of upstream transactions with a fault (default 0.4)")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"fault kinds to draw from (default: all of {', '.join(FAULTS)})")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sysmail-soak-"))
    os.environ.pop("RELAY_CONFIG", None)
    started = time.monotonic()
    try:
        result = soak(workdir, kills=args.kills, clients=args.clients, min_up=args.min_up,
                      max_up=args.max_up, fault_rate=args.fault_rate, seed=args.seed,
                      faults=args.faults,
                      say=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(result.table())
        print(f"{'total run time (s)':<41}  {time.monotonic() - started:.0f}")
        if args.keep:
            print(f"work directory: {workdir}")
    ok = not (result.lost or result.corrupted or result.dead or result.tracebacks)
    print("PASS: nothing acknowledged was lost" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
