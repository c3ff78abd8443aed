"""Power cuts under the installed daemon: every message that got 250 is delivered.

`sysmail-relay serve` runs with its state_dir on a PowerFS (tests/spool/powerfs.py: what is
not fsynced is gone at the cut) and delivers into the built-in `local` outbox, while
a few SMTP clients send to it and note each message that got 250. The power goes
off before a random file system operation (seeded; some during the daemon's start,
where recovery runs), the daemon is killed, and what survived is mounted again; the
daemon starts on it, under load again, until the next cut. After the last one it
runs until the outbox holds every message that ever got 250, each whole, with
nothing quarantined and no dead letter.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..support import Daemon, free_port
from .powerfs import PowerMount
from .powerloss import DAEMON_CUTS, SPLIT_RENAMES, seed

CLIENTS = 3
OPS_PER_CUT = 3000
"""The cut falls before one of this many operations after the daemon's start
(about a second of load here); the first ~150 are the start itself."""

TOKEN = re.compile(rb"^Message-ID: <(power-[0-9]+)@test>\r?$", re.MULTILINE)


def config(path: Path, state: Path, port: int) -> Path:
    path.write_text(f"""
state_dir = "{state}"
[listener]
port = {port}
[system_account]
address = "notify@example.com"
[queue]
retry_initial = "0.2s"
retry_max = "0.5s"
max_crashes = 100
[admin]
port = 0
""")
    return path


def body(rng: random.Random, n: int) -> tuple[bytes, bytes]:
    """A message (headers and body), and its body."""
    line = f"Line of message {n}, sent before a power cut.\r\n".encode()
    text = line * (rng.randint(2000, 4000) if rng.random() < 0.1 else rng.randint(1, 60))
    head = (f"From: app@example.com\r\nTo: boss@example.com\r\nSubject: power {n}\r\n"
            f"Message-ID: <power-{n}@test>\r\n\r\n").encode()
    return head + text, text


@contextmanager
def clients(port: int, rng: random.Random, acked: dict[str, bytes],
            numbers: Iterator[int]) -> Iterator[None]:
    """CLIENTS threads sending until the block ends; `acked` gets each that got 250."""
    stop = threading.Event()
    lock = threading.Lock()

    def run(rng: random.Random) -> None:
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                    while not stop.is_set():
                        with lock:
                            n = next(numbers)
                        data, text = body(rng, n)
                        smtp.sendmail("app@example.com", ["boss@example.com"], data)
                        with lock:
                            acked[f"power-{n}"] = text  # sendmail returned: 250
            except (OSError, smtplib.SMTPException):
                stop.wait(0.05)  # refused (the power is off) or gone (killed): again

    threads = [threading.Thread(target=run, args=(random.Random(rng.random()),))
               for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def wait_for_cut(mount: PowerMount, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not mount.is_cut():
        if time.monotonic() > deadline:
            mount.cut()  # the load stopped short of the chosen operation: cut now
            return
        time.sleep(0.05)


def delivered(state: Path) -> dict[str, list[bytes]]:
    """The outbox's messages by their token (a message delivered again: twice)."""
    found: dict[str, list[bytes]] = {}
    new = state / "outbox" / "new"
    for path in new.iterdir() if new.is_dir() else []:
        data = path.read_bytes()
        if match := TOKEN.search(data):
            found.setdefault(match.group(1).decode(), []).append(data)
    return found


@pytest.mark.timeout(60 + 20 * DAEMON_CUTS)
def test_every_message_that_got_250_is_delivered_after_power_cuts(tmp_path: Path) -> None:
    rng = random.Random(seed("daemon"))
    mnt, port = tmp_path / "mnt", free_port()
    relay_toml = config(tmp_path / "relay.toml", mnt / "state", port)
    daemon = Daemon(relay_toml, tmp_path / "serve.log", port)
    acked: dict[str, bytes] = {}
    numbers = iter(range(10**9))
    started = time.monotonic()
    mount = PowerMount(mnt, split_renames=SPLIT_RENAMES)
    try:
        for cut in range(DAEMON_CUTS):
            at = rng.randrange(OPS_PER_CUT)
            mount.cut(at)
            before = len(acked)
            try:
                daemon.start()
            except AssertionError:
                assert mount.is_cut(), daemon.log_text()  # it may not start: power off
            with clients(port, rng, acked, numbers):
                wait_for_cut(mount)
            if daemon.proc is not None:
                daemon.proc.kill()
                daemon.proc.wait(30)
            print(f"cut {cut}: before operation {at}, {len(acked) - before} got 250")
            mount.save(tmp_path / f"image{cut}", 0.0 if cut % 2 == 0 else 0.5,
                       rng.randrange(1 << 32))
            mount.unmount()
            mount = PowerMount(mnt, tmp_path / f"image{cut}", SPLIT_RENAMES)
        daemon.start()
        spool = mnt / "state" / "spool"
        deadline = time.monotonic() + 60
        while any(os.listdir(spool / place) for place in ("incoming", "queue", "active")):
            assert time.monotonic() < deadline, "the queue is not emptied"
            time.sleep(0.1)
        outbox = delivered(mnt / "state")
        assert sorted(set(acked) - set(outbox)) == [], "got 250, never delivered"
        assert sorted(p.name for p in (spool / "quarantine").iterdir()) == []
        assert sorted(p.name for p in (spool / "dead").iterdir()) == []
        torn = [token for token, text in acked.items()
                if not all(data.endswith(text) for data in outbox[token])]
        assert torn == [], f"delivered, but not whole: {torn}"
        assert daemon.stop() == 0, daemon.log_text()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(30)
        mount.unmount()
    again = sum(len(copies) - 1 for copies in outbox.values())
    print(f"daemon: {DAEMON_CUTS} cuts, {len(acked)} messages got 250, all delivered "
          f"({again} twice or more), {time.monotonic() - started:.1f} s")
