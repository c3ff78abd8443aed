"""A damaged spool: `sysmail-relay serve` quarantines what it cannot read and delivers the rest.

Messages are accepted over SMTP by the daemon (as an operator runs it) while the
account is inactive, the daemon is stopped, and the entries on disk are damaged
the ways a disk, a crash or a careless hand damages them: a truncated or invalid
envelope, a body without an envelope, an envelope without a body, a file that
cannot be read as one (as root, permissions do not stop a read, so a directory
stands where the file should be), an empty entry, a stray file in queue/. Each
must end in quarantine/ with a REASON file and a log line naming the entry, its
file and the reason; the rest of the queue is delivered; the daemon keeps running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import Daemon, daemon_config, free_port, to_old_layout

MESSAGE = ("From: App <app@apps.example.com>\r\nTo: ops@example.com\r\n"
           "Subject: Alert {n}\r\nMessage-ID: <{n}@apps.example.com>\r\n\r\nDisk {n} is fine.\r\n")


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class Relay:
    """The daemon, its spool and its outbox."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.config = daemon_config(tmp_path / "relay.toml", tmp_path / "state", self.port,
                                    active=False)
        self.daemon = Daemon(self.config, tmp_path / "relay.log", self.port)
        self.spool = tmp_path / "state" / "spool"

    def send(self, *names: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            for n in names:
                client.sendmail("app@apps.example.com", ["ops@example.com"],
                                MESSAGE.format(n=n).encode())

    def queue(self) -> list[str]:
        return sorted(os.listdir(self.spool / "queue"))

    def activate(self) -> None:
        self.config.write_text(self.config.read_text().replace("active = false",
                                                               "active = true"))

    def delivered(self) -> list[str]:
        new = self.tmp / "state" / "outbox" / "new"
        if not new.is_dir():
            return []
        found = []
        for path in new.iterdir():
            m = re.search(rb"Message-ID: <([^@>]+)@", path.read_bytes())
            assert m, path
            found.append(m.group(1).decode())
        return sorted(found)

    def quarantined(self) -> dict[str, str]:
        """Entry name -> the reason written beside it."""
        where = self.spool / "quarantine"
        return {name: (where / name / "REASON").read_text().strip()
                if (where / name / "REASON").is_file() else "(no REASON file)"
                for name in os.listdir(where)}

    def log(self) -> str:
        return self.daemon.log_text()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(tmp_path)
    yield r
    if r.daemon.proc is not None and r.daemon.proc.poll() is None:
        r.daemon.stop(signal.SIGKILL)


def fake_entry(relay: Relay, name: str, envelope: bytes | None, message: bytes | None,
               place: str = "queue") -> Path:
    entry = relay.spool / place / name
    entry.mkdir()
    if envelope is not None:
        (entry / "envelope.json").write_bytes(envelope)
    if message is not None:
        (entry / "message").write_bytes(message)
    return entry


def damage_and_restart(relay: Relay, damage: dict[str, Callable[[Path], None]],
                       good: int = 2) -> dict[str, str]:
    """Accept len(damage)+good messages, stop, damage, start active; name -> entry id."""
    names = [f"m{i}" for i in range(len(damage) + good)]
    relay.daemon.start()
    relay.send(*names)
    wait_for(lambda: len(relay.queue()) == len(names))
    assert relay.daemon.stop() == 0
    ids = dict(zip(names, relay.queue(), strict=True))  # ids sort by arrival
    for name, hurt in zip(names, damage.values(), strict=False):
        hurt(relay.spool / "queue" / ids[name])
    relay.activate()
    return ids


def truncate_envelope(entry: Path) -> None:
    path = entry / "envelope.json"
    path.write_bytes(path.read_bytes()[:37])


def garbage_envelope(entry: Path) -> None:
    (entry / "envelope.json").write_bytes(bytes(range(256)) * 4)


def envelope_without_recipients(entry: Path) -> None:
    path = entry / "envelope.json"
    data = json.loads(path.read_bytes())
    data["recipients"] = []
    path.write_text(json.dumps(data))


def envelope_not_an_object(entry: Path) -> None:
    (entry / "envelope.json").write_text('["not", "an", "envelope"]')


def body_without_envelope(entry: Path) -> None:
    (entry / "envelope.json").unlink()


def envelope_without_body(entry: Path) -> None:
    (entry / "message").unlink()


def unreadable_envelope(entry: Path) -> None:
    """As root a mode does not stop a read: a directory where the file should be does."""
    (entry / "envelope.json").unlink()
    (entry / "envelope.json").mkdir()


def unreadable_body(entry: Path) -> None:
    (entry / "message").unlink()
    (entry / "message").mkdir()


def empty_entry(entry: Path) -> None:
    shutil.rmtree(entry)
    entry.mkdir()


def body_is_a_dangling_link(entry: Path) -> None:
    (entry / "message").unlink()
    (entry / "message").symlink_to(entry / "gone")


def of_the_earlier_layout(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """The damage done to an entry of the earlier layout (a directory), as an upgrade
    finds it."""

    def damaged(entry: Path) -> None:
        to_old_layout(entry)
        damage(entry)

    return damaged


def header_cut_short(entry: Path) -> None:
    os.truncate(entry, 40)


def not_an_entry(entry: Path) -> None:
    entry.write_bytes(b"Subject: a stray copy\r\n\r\nno header\r\n")


def header_with_garbage(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[16:20] = b"\x00\xff[}"
    entry.write_bytes(bytes(data))


def saved_envelope_with_garbage(entry: Path) -> None:
    (entry.parent.parent / "envelopes" / entry.name).write_bytes(b'{"id": ')


def entry_is_a_fifo(entry: Path) -> None:
    entry.unlink()
    os.mkfifo(entry)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated envelope": of_the_earlier_layout(truncate_envelope),
    "binary garbage envelope": of_the_earlier_layout(garbage_envelope),
    "envelope without recipients": of_the_earlier_layout(envelope_without_recipients),
    "envelope that is not an object": of_the_earlier_layout(envelope_not_an_object),
    "body without envelope": of_the_earlier_layout(body_without_envelope),
    "envelope without body": of_the_earlier_layout(envelope_without_body),
    "envelope unreadable (a directory)": of_the_earlier_layout(unreadable_envelope),
    "body unreadable (a directory)": of_the_earlier_layout(unreadable_body),
    "empty entry": of_the_earlier_layout(empty_entry),
    "body is a dangling symlink": of_the_earlier_layout(body_is_a_dangling_link),
    "header cut short": header_cut_short,
    "not an entry": not_an_entry,
    "header with garbage": header_with_garbage,
    "saved envelope with garbage": saved_envelope_with_garbage,
    "entry is a fifo": entry_is_a_fifo,
}
REASONS = {  # what the log line and REASON must say, beyond the entry's name
    "truncated envelope": r"envelope\.json: the envelope cannot be read",
    "binary garbage envelope": r"envelope\.json: the envelope cannot be read",
    "envelope without recipients": r"envelope\.json: the envelope cannot be read .*recipients",
    "envelope that is not an object": r"envelope\.json: the envelope cannot be read",
    "body without envelope": r"envelope\.json: the envelope is missing",
    "envelope without body": r": the message file is missing",
    "envelope unreadable (a directory)": r"envelope\.json: Is a directory",
    "body unreadable (a directory)": r": the message file is missing",
    "empty entry": r"envelope\.json: the envelope is missing",
    "body is a dangling symlink": r"message: is a symbolic link \(not followed",
    "header cut short": r": not a spool entry: it is cut short in its header",
    "not an entry": r": not a spool entry: it does not begin with the spool's header",
    "header with garbage": r": the envelope in its header cannot be read",
    "saved envelope with garbage": r": its saved envelope .*envelopes/\w+: the envelope "
                                   "cannot be read",
    "entry is a fifo": r": not a spool entry \(neither a file nor a directory\)",
}


def test_damaged_entries_are_quarantined_with_a_reason_and_the_rest_is_delivered(
        relay: Relay) -> None:
    ids = damage_and_restart(relay, DAMAGE, good=3)
    # and a damaged entry that a delivery had claimed when the relay was killed (active/)
    claimed = fake_entry(relay, "0000000000001CLAIMED00", b'{"id": "0000000000001CLAI', b"x",
                         place="active")
    relay.daemon.start()
    wait_for(lambda: len(relay.delivered()) == 3)
    assert relay.delivered() == sorted(f"m{i}" for i in range(len(DAMAGE), len(DAMAGE) + 3))
    wait_for(lambda: len(relay.quarantined()) == len(DAMAGE) + 1)
    quarantined = relay.quarantined()
    log = relay.log()
    for kind, queue_id in zip(DAMAGE, ids.values(), strict=False):
        reason = quarantined.get(queue_id)
        assert reason is not None, f"{kind}: {queue_id} not in quarantine"
        assert queue_id in reason and re.search(REASONS[kind], reason), f"{kind}: {reason}"
        line = next((ln for ln in log.splitlines()
                     if f"{queue_id}: moved to quarantine:" in ln), None)
        assert line is not None, f"{kind}: no log line for {queue_id}"
        assert re.search(REASONS[kind], line), f"{kind}: {line}"
        assert " error " in line, line
    assert claimed.name in quarantined
    assert re.search(rf"{claimed.name}: moved to quarantine: .*active/{claimed.name}/"
                     r"envelope\.json: the envelope cannot be read", log)
    # the upstream has the three before the relay has moved them out of active/
    wait_for(lambda: os.listdir(relay.spool / "active") == [])
    assert relay.queue() == [] and os.listdir(relay.spool / "dead") == []
    # still serving, and nothing in quarantine was deleted or rewritten
    relay.send("after")
    wait_for(lambda: "after" in relay.delivered())
    kept = (relay.spool / "quarantine" / ids["m0"] / "message").read_bytes()
    assert b"Message-ID: <m0@apps.example.com>" in kept
    assert "Traceback" not in log
    assert relay.daemon.stop() == 0


def test_a_stray_file_in_the_queue_is_quarantined_and_the_daemon_starts(relay: Relay) -> None:
    """A file where an entry directory should be (a stray `cp`, an editor's backup)."""
    damage_and_restart(relay, {}, good=2)
    stray = relay.spool / "queue" / "0000000000000STRAYFILE"
    stray.write_bytes(b"not an entry\n")
    relay.daemon.start()
    wait_for(lambda: relay.delivered() == ["m0", "m1"])
    assert stray.name in relay.quarantined()
    assert re.search(r"0000000000000STRAYFILE: moved to quarantine: .*STRAYFILE: "
                     "not a spool entry: it does not begin with the spool's header", relay.log())
    kept = relay.spool / "quarantine" / stray.name
    assert b"not an entry\n" in ([kept.read_bytes()] if kept.is_file() else
                                  [p.read_bytes() for p in kept.iterdir()])
    assert relay.daemon.stop() == 0


def test_entries_damaged_while_the_daemon_runs_are_quarantined_at_delivery(
        relay: Relay) -> None:
    relay.daemon.start()
    relay.send("a", "b", "c", "d")
    wait_for(lambda: len(relay.queue()) == 4)
    first, second, _, _ = relay.queue()
    of_the_earlier_layout(truncate_envelope)(relay.spool / "queue" / first)  # once indexed
    of_the_earlier_layout(envelope_without_body)(relay.spool / "queue" / second)
    relay.activate()
    relay.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: relay.delivered() == ["c", "d"])
    wait_for(lambda: sorted(relay.quarantined()) == [first, second])
    log = relay.log()
    assert re.search(rf"{first}: moved to quarantine: .*active/{first}/envelope\.json: "
                     "the envelope cannot be read", log)
    assert re.search(rf"{second}: moved to quarantine: .*{second}: the message file is missing",
                     log)
    relay.send("e")
    wait_for(lambda: "e" in relay.delivered())
    assert "Traceback" not in log
    assert relay.daemon.stop() == 0


def hand_edit(field: str, value: object) -> Callable[[Path], None]:
    """An envelope that is valid JSON with a field of the wrong type (a hand edit gone wrong)."""

    def edit(entry: Path) -> None:
        path = entry / "envelope.json"
        data = json.loads(path.read_bytes())
        data[field] = value
        path.write_text(json.dumps(data))

    return edit


def copied_under_another_name(entry: Path) -> None:
    """`cp -a queue/ID queue/ID.copy`: the envelope's id is not the entry's name."""
    shutil.copytree(entry, entry.with_name(entry.name[:-4] + "COPY"))
    shutil.rmtree(entry)


@pytest.mark.parametrize("damage", [
    pytest.param(hand_edit("next_attempt", "soon"), id="next_attempt-a-string"),
    pytest.param(hand_edit("next_attempt", None), id="next_attempt-null"),
    pytest.param(copied_under_another_name, id="envelope-id-not-the-entry-name"),
])
def test_a_well_formed_but_invalid_envelope_is_quarantined_not_fatal(
        relay: Relay, damage: Callable[[Path], None]) -> None:
    """Valid JSON that is no valid envelope: quarantined like any damaged entry.

    The daemon must start, deliver the others and serve; the entry must not be
    left in queue/ forever without a word, nor crash the scheduler.
    """
    relay.daemon.start()
    relay.send("bad", "good1", "good2")
    wait_for(lambda: len(relay.queue()) == 3)
    assert relay.daemon.stop() == 0
    damage(to_old_layout(relay.spool / "queue" / relay.queue()[0]))
    relay.activate()
    relay.daemon.start()
    relay.send("after")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            relay.delivered() == ["after", "good1", "good2"] and relay.quarantined()
            and not os.listdir(relay.spool / "active")):
        time.sleep(0.1)
    log = relay.log()
    state = (f"delivered {relay.delivered()}, quarantined {relay.quarantined()}, left in "
             f"queue/ {relay.queue()}, in active/ {os.listdir(relay.spool / 'active')}; "
             "log:\n" + "\n".join(ln for ln in log.splitlines()[-30:]
                                  if " info " not in ln))
    assert relay.daemon.proc is not None and relay.daemon.proc.poll() is None, state
    assert relay.delivered() == ["after", "good1", "good2"], state
    assert len(relay.quarantined()) == 1, state
    (name, reason), = relay.quarantined().items()
    assert f"{name}: moved to quarantine:" in log and "envelope.json" in reason, state
    assert relay.queue() == [] and os.listdir(relay.spool / "active") == [], state
    assert "Traceback" not in log, state
    assert relay.daemon.stop() == 0


@pytest.mark.timeout(90)
def test_an_envelope_that_blocks_on_read_does_not_hang_the_daemon(relay: Relay) -> None:
    """A FIFO where envelope.json should be: open() would wait forever for a writer."""
    relay.daemon.start()
    relay.send("bad", "good")
    wait_for(lambda: len(relay.queue()) == 2)
    assert relay.daemon.stop() == 0
    envelope = to_old_layout(relay.spool / "queue" / relay.queue()[0]) / "envelope.json"
    envelope.unlink()
    os.mkfifo(envelope)
    relay.activate()
    relay.daemon.start(timeout=15)  # the daemon must come up at all
    wait_for(lambda: relay.delivered() == ["good"], timeout=10)
    wait_for(lambda: len(relay.quarantined()) == 1, timeout=5)
    assert relay.daemon.stop() == 0


def test_entries_of_the_earlier_layout_are_delivered_after_an_upgrade(relay: Relay) -> None:
    """What an upgrade finds on disk: entries in the earlier layout (a directory with
    `message` and `envelope.json`), waiting in queue/, or in active/ because the old
    version was killed while it sent one. They are delivered once, with the rewrite,
    beside entries of the current layout, and nothing of them is left behind."""
    relay.daemon.start()
    relay.send("old-queued", "old-active", "new")
    wait_for(lambda: len(relay.queue()) == 3)
    assert relay.daemon.stop() == 0
    queued, active, _ = relay.queue()
    assert all((relay.spool / "queue" / q).is_file() for q in relay.queue())
    to_old_layout(relay.spool / "queue" / queued)
    os.rename(to_old_layout(relay.spool / "queue" / active), relay.spool / "active" / active)
    relay.activate()
    relay.daemon.start()
    wait_for(lambda: relay.delivered() == ["new", "old-active", "old-queued"])
    wait_for(lambda: not any(os.listdir(relay.spool / place)
                             for place in ("queue", "active", "envelopes", "trash")))
    assert relay.quarantined() == {}
    sent = b"".join(p.read_bytes() for p in (relay.tmp / "state" / "outbox" / "new").iterdir())
    assert sent.count(b"Subject: Alert old-queued") == 1 and b"RELAYQ1" not in sent
    log = relay.log()
    assert f"{active}: " in log and "Traceback" not in log
    assert relay.daemon.stop() == 0
