"""The spool keeps every message until the upstream has it, whatever stops the relay."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import DamagedEntry, SpoolError
from relay.spool import Envelope, Recipient, Spool, new_queue_id, read_regular


def envelope(*rcpts: str) -> Envelope:
    return Envelope(id=new_queue_id(), sender="app@example.com",
                    recipients=[Recipient(r) for r in rcpts or ("a@example.com",)],
                    mail_from="notify@example.com")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    s.open()
    yield s
    s.close()


def test_stored_message_is_in_the_queue_with_its_envelope(spool: Spool) -> None:
    env = envelope("a@example.com", "b@example.com")
    spool.store(env, b"Subject: hi\r\n\r\nbody\r\n")
    assert spool.ids("queue") == [env.id]
    assert spool.ids("incoming") == []
    back = spool.read(env.id, "queue")
    assert [r.address for r in back.recipients] == ["a@example.com", "b@example.com"]
    stored = (spool.root / "queue" / env.id / "message").read_bytes()
    assert stored == b"Subject: hi\r\n\r\nbody\r\n"


def test_queue_ids_sort_by_arrival_and_are_unique() -> None:
    spaced = []
    for _ in range(5):
        spaced.append(new_queue_id())
        time.sleep(0.002)
    assert spaced == sorted(spaced)
    burst = [new_queue_id() for _ in range(1000)]
    assert len(set(burst)) == 1000 and all(len(i) == 21 for i in burst)


@pytest.mark.parametrize("size", [0, 1, 4096, 3 << 20])
def test_read_regular_reads_whole_files_and_refuses_the_rest(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "file").write_bytes(data)
    assert read_regular(tmp_path / "file") == data
    os.mkfifo(tmp_path / "fifo")  # would block a plain read: refused at once
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(tmp_path / "fifo")
    with pytest.raises(IsADirectoryError):
        read_regular(tmp_path)


def test_claim_is_exclusive(spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    assert spool.claim(env.id) is not None
    assert spool.claim(env.id) is None


def test_release_keeps_recipient_states(spool: Spool) -> None:
    env = envelope("a@example.com", "b@example.com")
    spool.store(env, b"x\r\n")
    claimed = spool.claim(env.id)
    assert claimed is not None
    claimed.recipients[0].state = "delivered"
    claimed.attempts = 3
    spool.release(claimed)
    back = spool.read(env.id, "queue")
    assert [r.state for r in back.recipients] == ["delivered", "pending"]
    assert back.attempts == 3


def test_finish_removes_the_entry(spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    spool.claim(env.id)
    spool.finish(env.id)
    assert spool.find(env.id) is None
    assert spool.removed()
    kept = list((spool.root / "trash").iterdir())  # emptied, for the next message
    assert [p.stat().st_size for entry in kept for p in entry.iterdir()] == [0, 0]


def test_small_delivered_message_is_overwritten_by_the_next_or_emptied_soon_after(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small delivered entry is kept as it is (no thread woken per message): the next
    message is written over it, every byte replaced; one not taken is emptied by the
    sweep, so delivered mail does not stay on disk."""
    import relay.spool as spool_module

    monkeypatch.setattr(spool_module._Remover, "SWEEP", 0.05)
    old = [envelope() for _ in range(2)]
    assert spool.store_batch([(env, b"old secret\r\n" * 100) for env in old]) == [None] * 2
    for env in old:
        spool.claim(env.id)
        spool.finish(env.id, size=1200)
    new = envelope()
    spool.store(new, b"new\r\n")
    assert spool.message_path(new.id, "queue").read_bytes() == b"new\r\n"
    assert spool.read(new.id, "queue").id == new.id
    assert spool.removed()
    kept = list((spool.root / "trash").iterdir())
    assert len(kept) == 1 and [p.stat().st_size for p in kept[0].iterdir()] == [0, 0]


def test_a_kept_entry_is_emptied_only_once_it_has_been_kept_the_sweep_time(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.spool as spool_module

    monkeypatch.setattr(spool_module._Remover, "SWEEP", 0.4)
    first, second = envelope(), envelope()
    assert spool.store_batch([(e, b"delivered\r\n") for e in (first, second)]) == [None] * 2
    trash = spool.root / "trash"
    spool.claim(first.id)
    spool.finish(first.id, size=11)
    time.sleep(0.25)
    spool.claim(second.id)
    spool.finish(second.id, size=11)
    deadline = time.monotonic() + 5
    while (trash / first.id / "message").stat().st_size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (trash / first.id / "message").stat().st_size == 0
    assert (trash / second.id / "message").stat().st_size == 11  # kept 0.15 s: not yet
    assert spool.removed()
    assert (trash / second.id / "message").stat().st_size == 0


def test_large_delivered_message_is_emptied_at_once(spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"x" * 70_000 + b"\r\n")
    spool.claim(env.id)
    spool.finish(env.id, size=70_002)
    assert spool.removed()
    kept = list((spool.root / "trash").iterdir())
    assert [p.stat().st_size for entry in kept for p in entry.iterdir()] == [0, 0]


def test_emptied_entries_are_reused_for_new_messages_and_the_rest_removed(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.spool as spool_module

    monkeypatch.setattr(spool_module._Remover, "REUSE", 3)
    first = [envelope() for _ in range(5)]
    assert spool.store_batch([(env, b"old secret\r\n" * 100) for env in first]) == [None] * 5
    inodes = set()
    for env in first:
        spool.claim(env.id)
        inodes.add((spool.root / "active" / env.id / "message").stat().st_ino)
        spool.finish(env.id)
    assert spool.removed()
    assert len(os.listdir(spool.root / "trash")) == 3  # at most REUSE kept, the rest deleted
    second = [envelope() for _ in range(4)]
    assert spool.store_batch([(env, b"new\r\n") for env in second]) == [None] * 4
    reused = {(spool.root / "queue" / env.id / "message").stat().st_ino for env in second}
    # the three kept were taken (a fresh file may get a freed inode's number too)
    assert len(reused & inodes) >= 3 and os.listdir(spool.root / "trash") == []
    for env in second:
        assert (spool.root / "queue" / env.id / "message").read_bytes() == b"new\r\n"
        assert spool.read(env.id, "queue").id == env.id


def test_failed_write_leaves_nothing_behind(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SpoolError, match="No space left on device"):
        spool.store(envelope(), b"x" * 1000)
    assert spool.ids("queue") == [] and os.listdir(spool.root / "incoming") == []


def test_recovery_puts_claimed_entries_back_and_counts_the_crash(spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    spool.claim(env.id)
    report = spool.recover(max_crashes=5)
    assert report.requeued == [env.id]
    assert spool.read(env.id, "queue").crashes == 1


def test_entry_that_keeps_crashing_the_worker_becomes_a_dead_letter(spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    for _ in range(3):
        spool.claim(env.id)
        report = spool.recover(max_crashes=3)
    assert report.crashed_out == [env.id]
    dead = spool.read(env.id, "dead")
    assert dead.dead_reason is not None and "interrupted 3 times" in dead.dead_reason


def test_recovery_removes_unfinished_receptions(spool: Spool) -> None:
    (spool.root / "incoming" / "ABC").mkdir()
    (spool.root / "incoming" / "ABC" / "message").write_bytes(b"half")
    report = spool.recover(max_crashes=5)
    assert report.removed_incoming == 1
    assert os.listdir(spool.root / "incoming") == []


def test_recovery_returns_entries_taken_by_the_command_line(spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    spool.claim(env.id, "queue", "edit")
    spool.recover(max_crashes=5)
    assert spool.read(env.id, "queue").crashes == 0


@pytest.mark.parametrize("damage", ["truncated envelope", "no envelope", "no message"])
def test_damaged_entries_are_recognised_and_quarantined(spool: Spool, damage: str) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    entry = spool.root / "queue" / env.id
    if damage == "truncated envelope":
        (entry / "envelope.json").write_bytes((entry / "envelope.json").read_bytes()[:20])
    elif damage == "no envelope":
        (entry / "envelope.json").unlink()
    else:
        (entry / "message").unlink()
    with pytest.raises(DamagedEntry):
        spool.read(env.id, "queue")
    os.rename(entry, spool.root / "active" / env.id)  # as if a delivery had claimed it
    report = spool.recover(max_crashes=5)
    assert [q for q, _ in report.quarantined] == [env.id]
    assert (spool.root / "quarantine" / env.id / "REASON").read_text().strip()


def test_unwritable_spool_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match=r"not usable.*set state_dir"):
        Spool(blocker / "spool").open()


def test_a_batch_is_committed_together_with_one_syncfs(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.spool_writer as writer_module

    calls: list[str | os.PathLike[str]] = []
    real = writer_module.syncfs

    def counting(directory: str | os.PathLike[str]) -> bool:
        calls.append(directory)
        return real(directory)

    monkeypatch.setattr(writer_module, "syncfs", counting)
    envelopes = [envelope() for _ in range(6)]
    errors = spool.store_batch([(env, b"x\r\n") for env in envelopes])
    assert errors == [None] * 6 and len(calls) == 1
    assert spool.ids("queue") == sorted(env.id for env in envelopes)
    assert os.listdir(spool.root / "incoming") == []
    assert spool.store_batch([(envelope(), b"y\r\n")]) == [None] and len(calls) == 1  # small: fsync


async def test_commit_from_many_tasks_stores_every_message(spool: Spool) -> None:
    import asyncio

    envelopes = [envelope() for _ in range(50)]
    await asyncio.gather(*(spool.commit(env, b"z\r\n") for env in envelopes))
    assert spool.ids("queue") == sorted(env.id for env in envelopes)


def _cmdline(pid: int) -> list[bytes]:
    """The process's arguments; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except FileNotFoundError:
        return []


async def test_commit_writes_in_the_writer_process_never_on_the_event_loop(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading

    import relay.spool as spool_module
    import relay.spool_process as process_module

    callers: list[str] = []
    real = process_module.Writer.store

    def recording(self: process_module.Writer, *args: Any) -> list[str | None]:
        callers.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(process_module.Writer, "store", recording)
    small, large = envelope(), envelope()
    big = b"y" * (spool_module.INLINE_BYTES + 1)  # more than the writer reads at once
    await asyncio.gather(spool.commit(small, b"z\r\n"), spool.commit(large, [b"x", big]))
    assert callers and set(callers) == {"spool-commit"}
    pid = spool.writer_pid
    assert pid is not None and pid != os.getpid()
    assert _cmdline(pid)[-2].endswith(b"spool_writer.py")
    assert (spool.root / "queue" / large.id / "message").read_bytes() == b"x" + big
    assert spool.read(small.id, "queue").id == small.id
    spool.close()
    assert not _cmdline(pid)  # stopped and reaped


async def test_a_message_that_does_not_fit_fails_alone_and_the_batch_goes_on(
        small_disk: Path) -> None:
    """A real ENOSPC inside the writer process, in the middle of a streamed message:
    the messages before and after it in the same batch are stored intact."""
    import asyncio

    spool = Spool(small_disk / "spool")
    spool.open()
    try:
        before, too_big, after = envelope(), envelope(), envelope()
        huge = [b"h" * (1 << 20)] * 3  # 3 MiB on a 2 MiB file system
        results = await asyncio.gather(
            spool.commit(before, b"first\r\n"), spool.commit(too_big, huge),
            spool.commit(after, b"last\r\n" * 1000), return_exceptions=True)
        assert results[0] is None and results[2] is None, results
        assert isinstance(results[1], SpoolError) and "No space left" in str(results[1])
        assert spool.ids("queue") == sorted([before.id, after.id])
        assert (spool.root / "queue" / after.id / "message").read_bytes() == b"last\r\n" * 1000
        assert os.listdir(spool.root / "incoming") == []
    finally:
        spool.close()


async def test_a_writer_process_that_died_is_replaced_and_nothing_is_lost(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import signal

    await spool.commit(envelope(), b"one\r\n")
    first = spool.writer_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await asyncio.sleep(0.1)
    second = envelope()
    await spool.commit(second, b"two\r\n")  # written by the relay itself
    assert "the spool writer process stopped" in caplog.text
    assert (spool.root / "queue" / second.id / "message").read_bytes() == b"two\r\n"
    third = envelope()
    await spool.commit(third, b"three\r\n")
    assert spool.writer_pid not in (None, first)
    assert len(spool.ids("queue")) == 3 and os.listdir(spool.root / "incoming") == []


def test_a_message_the_stopped_writer_had_queued_is_kept_not_written_twice(
        spool: Spool) -> None:
    env = envelope()
    spool.store(env, b"queued by the writer before it stopped\r\n")
    request = (env.id, "", env.to_json(), [b"must not replace it\r\n"])
    assert spool._finish_store(*request) is None
    assert (spool.root / "queue" / env.id / "message").read_bytes() == (
        b"queued by the writer before it stopped\r\n")


def test_a_commit_syncs_where_names_left_before_where_they_arrive(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a journal, a crash between two directory syncs must leave an entry in
    neither place rather than in both: start-up empties incoming/ and trash/."""
    import relay.spool_writer as writer_module

    old = envelope()
    spool.store(old, b"delivered\r\n")
    spool.claim(old.id)
    spool.finish(old.id)
    assert spool.removed()
    synced: list[str] = []
    real = writer_module.fsync_dir

    def recording(path: str | os.PathLike[str]) -> None:
        synced.append(Path(path).name if Path(path).parent == spool.root else "entry")
        real(path)

    monkeypatch.setattr(writer_module, "fsync_dir", recording)
    spool.store(envelope(), b"new\r\n")  # one message: reuses the emptied entry
    assert synced == ["trash", "entry", "incoming", "queue"]
    synced.clear()
    assert spool.store_batch([(envelope(), b"n\r\n") for _ in range(5)]) == [None] * 5
    assert synced == ["incoming", "queue"]  # a batch: syncfs first, then both directories


async def test_a_writer_process_that_cannot_start_leaves_the_relay_writing_itself(
        spool: Spool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import relay.spool_process as process_module

    monkeypatch.setattr(process_module.sys, "executable", "/nonexistent/python3")
    spool.start_writer()
    first, second = envelope(), envelope()
    await spool.commit(first, b"one\r\n")
    await spool.commit(second, b"two\r\n")
    assert spool.ids("queue") == sorted([first.id, second.id])
    assert spool.writer_pid is None
    warnings = [r.getMessage() for r in caplog.records if "spool writer" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once, not for every batch
    assert "could not start" in warnings[0] and "/nonexistent/python3" in warnings[0]


def test_a_writer_whose_relay_was_killed_queues_nothing(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay starting after a kill empties incoming/: the old writer must not move
    entries into queue/ behind its back. (Here the writer's checks run in this process,
    with a relay pid that is not this process's parent.)"""
    import relay.spool_writer as writer_module

    monkeypatch.setattr(writer_module, "_RELAY", os.getpid())
    env = envelope()
    with pytest.raises(SystemExit):
        spool.store(env, b"nobody waits for this\r\n")
    assert spool.ids("queue") == [] and os.listdir(spool.root / "incoming") == [env.id]


def _when_the_envelope_is_opened(monkeypatch: pytest.MonkeyPatch,
                                 before: Callable[[], None],
                                 after: Callable[[], None] = lambda: None) -> list[bool]:
    """Run `before` and `after` around the first open of an envelope, whichever way
    `Spool.read` opens it (a path, or a name in a directory it holds open): the
    entry moves at the same point between the file system calls on every run."""
    real = os.open
    fired: list[bool] = []

    def hooked(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if fired or not os.fspath(path).endswith("envelope.json"):
            return real(path, flags, *args, **kwargs)
        fired.append(True)
        before()
        try:
            return real(path, flags, *args, **kwargs)
        finally:
            after()

    monkeypatch.setattr(os, "open", hooked)
    return fired


def test_read_of_an_entry_deferred_between_its_two_reads_is_not_called_damaged(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flaky CI failure: a reader of queue/ID (`find`, the scheduler's index, a test)
    while a delivery claims the entry and puts it back (queue/ to active/ and back)
    between the reader's first look and its reading of the envelope."""
    env = envelope()
    spool.store(env, b"x\r\n")
    fired = _when_the_envelope_is_opened(
        monkeypatch,
        before=lambda: os.rename(spool.root / "queue" / env.id, spool.root / "active" / env.id),
        after=lambda: spool.put_back(env.id))
    back = spool.read(env.id, "queue")
    assert fired == [True] and back.id == env.id
    assert spool.ids("queue") == [env.id]


def test_find_of_an_entry_deferred_while_it_is_looked_for_finds_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    env = envelope()
    spool.store(env, b"x\r\n")
    assert spool.claim(env.id) is not None
    fired = _when_the_envelope_is_opened(monkeypatch, before=lambda: spool.put_back(env.id))
    found = spool.find(env.id)
    assert fired == [True] and found is not None and found[1].id == env.id


def test_read_of_an_entry_delivered_while_it_is_read_is_not_found_not_damaged(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`queue show` while the entry is delivered: gone (or emptied for reuse) between
    the reader's first look and its reading of the envelope."""
    gone, emptied = envelope(), envelope()
    for env in (gone, emptied):
        spool.store(env, b"x\r\n")
        assert spool.claim(env.id) is not None

    def delivered() -> None:
        spool.finish(gone.id)  # a size unknown: removed, not kept
        assert spool.removed()

    _when_the_envelope_is_opened(monkeypatch, before=delivered)
    with pytest.raises(FileNotFoundError):
        spool.read(gone.id, "active")
    assert spool.find(gone.id) is None

    def emptied_for_reuse() -> None:
        trash = spool.root / "trash" / emptied.id
        os.rename(spool.root / "active" / emptied.id, trash)
        os.truncate(trash / "envelope.json", 0)
        os.truncate(trash / "message", 0)

    _when_the_envelope_is_opened(monkeypatch, before=emptied_for_reuse)
    with pytest.raises(FileNotFoundError):
        spool.read(emptied.id, "active")


def test_an_entry_damaged_where_it_stays_is_damaged(spool: Spool) -> None:
    damaged = envelope()
    spool.store(damaged, b"y\r\n")
    (spool.root / "queue" / damaged.id / "message").unlink()
    with pytest.raises(DamagedEntry, match="the message file is missing"):
        spool.find(damaged.id)
    linked = envelope()
    spool.store(linked, b"z\r\n")
    os.rename(spool.root / "queue" / linked.id, spool.root / "edit" / linked.id)
    (spool.root / "queue" / linked.id).symlink_to(spool.root / "edit" / linked.id)
    with pytest.raises(DamagedEntry, match="a symbolic link, not an entry"):
        spool.read(linked.id, "queue")
