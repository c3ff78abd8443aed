"""Power cuts under the spool: nothing that got 250 is lost, half-written or quarantined.

Each cut mounts a fresh PowerFS (tests/spool/powerfs.py: what is not fsynced is gone at
the cut), opens a `Spool` on it and commits messages from many sessions at once
(small ones written in one piece, large ones spilled while they arrive, one with an
envelope too large for its header's room), while a delivery thread takes committed
entries and finishes or defers them. The power goes off before a random operation
(seeded); then the spool is started on what survived and `check_spool` looks for
every message whose commit returned. Half the cuts drop every unsynced change, the
other half keep a random part of them (torn files, half-made renames).

The last tests take the commit's directory fsync, or its fdatasync, away and show
that the same check then finds the loss.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.spool import Envelope, Recipient, Spool, new_queue_id
from relay.spool import incoming as spool_incoming

from .powerfs import mounted
from .powerloss import SPLIT_RENAMES, SPOOL_CUTS, Sent, check_spool, seed

MESSAGES = 48
SESSIONS = 12


def message(rng: random.Random, n: int) -> tuple[list[Recipient], bytes]:
    kind = rng.random()
    size = rng.randint(300, 200_000) if kind < 0.15 else rng.randint(200, 6000)
    recipients = 700 if n == 7 else rng.randint(1, 3)  # 700: a header beyond RESERVED
    line = f"Message {n}: power cut test line.\r\n".encode()
    body = b"Subject: power %d\r\n\r\n" % n + line * (size // len(line) + 1)
    return [Recipient(f"user{n}.{i}@example.com") for i in range(recipients)], body


async def load(spool: Spool, rng: random.Random, sent: Sent) -> None:
    """MESSAGES commits from SESSIONS sessions at once, and a delivery thread."""
    sessions = asyncio.Semaphore(SESSIONS)
    plans = [message(rng, n) for n in range(MESSAGES)]
    committed: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    async def session(recipients: list[Recipient], body: bytes) -> None:
        async with sessions:
            env = Envelope(id=new_queue_id(), sender="app@example.com",
                           recipients=recipients, size=len(body), as_received=True)
            incoming = spool.receive(env.id)
            try:
                for at in range(0, len(body), 32768):
                    await incoming.write(body[at:at + 32768])
                await spool.commit(env, incoming)
            except (SpoolError, OSError):
                incoming.discard()
                return
            sent.acked[env.id] = (env, body)  # the client would have its 250 now
            committed.put(env.id)

    def deliver(rng: random.Random) -> None:
        while (qid := committed.get()) is not None:
            try:
                env = spool.claim(qid)
                if env is None:
                    continue
                if rng.random() < 0.5:
                    sent.delivered.add(qid)  # before: a cut in `finish` may keep it or not
                    spool.finish(qid)
                else:
                    env.attempts += 1
                    env.recipients[0].reply = "451 4.3.0 try later"
                    spool.release(env)
            except OSError:
                return  # the power is off

    thread = threading.Thread(target=deliver, args=(random.Random(rng.random()),))
    thread.start()
    try:
        await asyncio.gather(*(session(*plan) for plan in plans))
    finally:
        committed.put(None)
        await asyncio.to_thread(thread.join)


async def cut_once(tmp: Path, rng: random.Random, cut_at: int | None, keep: float
                   ) -> tuple[Sent, Path, int]:
    """One run under load, the power cut before operation `cut_at` (None: after the
    load); what the clients were told, where the survivors are, the operations done."""
    sent = Sent()
    with mounted(tmp / "mnt", SPLIT_RENAMES) as mount:
        if cut_at is not None:
            mount.cut(cut_at)
        spool = Spool(tmp / "mnt" / "spool")
        try:
            spool.open()
            await load(spool, rng, sent)
        except SpoolError:
            pass  # the power went off while the spool was being made
        finally:
            await asyncio.to_thread(spool.close)
        ops = mount.ops()
        mount.save(tmp / "survived", keep, rng.randrange(1 << 32))
    return sent, tmp / "survived" / "spool", ops


@pytest.mark.timeout(60 + 5 * SPOOL_CUTS)
async def test_a_power_cut_loses_nothing_that_got_250(tmp_path: Path) -> None:
    rng = random.Random(seed("spool"))
    _, _, total = await cut_once(tmp_path, rng, None, 0.0)  # how many operations a run does
    problems: list[str] = []
    acked = delivered = 0
    started = time.monotonic()
    for cut in range(SPOOL_CUTS):
        at = rng.randrange(total + 1)
        keep = 0.0 if cut % 2 == 0 else 0.5
        sent, survivors, _ = await cut_once(tmp_path / f"cut{cut}", rng, at, keep)
        found = check_spool(survivors, sent) if survivors.exists() else [
            f"{qid}: got 250, then lost (no spool at all)" for qid in sent.acked]
        problems += [f"cut {cut} (before operation {at} of {total}, keep {keep}): {p}"
                     for p in found]
        acked, delivered = acked + len(sent.acked), delivered + len(sent.delivered)
    print(f"spool: {SPOOL_CUTS} cuts, {acked} messages got 250 ({delivered} of them then "
          f"delivered), {time.monotonic() - started:.1f} s")
    assert problems == []


async def test_without_the_queue_directory_fsync_the_check_finds_the_loss(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_incoming, "fsync_dir", lambda path: None)
    # and no deliveries: their own fsyncs (a claim's of active/, a deferral's of queue/)
    # would make the commits durable by the way
    monkeypatch.setattr(Spool, "claim", lambda *args, **kwargs: None)
    sent, survivors, _ = await cut_once(tmp_path, random.Random(1), None, 0.0)
    problems = check_spool(survivors, sent)
    assert sent.acked and any(p.endswith("got 250, then lost") for p in problems), problems


async def test_without_the_message_fdatasync_the_check_finds_half_written_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_incoming.os, "fdatasync", lambda fd: None)
    sent, survivors, _ = await cut_once(tmp_path, random.Random(2), None, 0.0)
    problems = check_spool(survivors, sent)
    assert sent.acked and any("got 250, half-written" in p for p in problems), problems
