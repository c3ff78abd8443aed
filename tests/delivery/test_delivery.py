"""The scheduler: retries with backoff, per-recipient failures, dead letters, held mail."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.settings import Settings, load_settings
from tests.support import (
    RawSMTP,
    RelayFactory,
    ScriptedUpstream,
    listener_port,
    outbox_files,
    settings_for,
    wait_until,
)

MESSAGE = b"From: App <app@example.com>\r\nSubject: Alert\r\n\r\nDisk almost full.\r\n.\r\n"
FAST_RETRY = {"retry_initial": "0.2s", "retry_max": "0.4s"}


async def send(relay: Relay, *rcpts: str) -> str:
    client = await RawSMTP.connect(listener_port(relay))
    await client.cmd("EHLO app.example.com")
    reply = await client.transaction(MESSAGE, rcpts=rcpts or ("user@example.com",))
    await client.close()
    assert reply.startswith("250"), reply
    return reply.rsplit(" ", 1)[1]


def scripted(upstream: ScriptedUpstream):  # type: ignore[no-untyped-def]
    return lambda _settings: upstream


def counter(relay: Relay, result: str, server: str = "local") -> float:
    value: float = relay.metrics.deliveries.labels(server, result)._value.get()
    return value


async def test_temporary_failure_is_retried_then_delivered(relay_factory: RelayFactory) -> None:
    upstream = ScriptedUpstream({"user@example.com": ["451 4.3.0 try again", "250 2.0.0 ok"]})
    relay = await relay_factory(upstreams=scripted(upstream), queue=FAST_RETRY)
    queue_id = await send(relay)
    await wait_until(lambda: len(upstream.received) == 1)
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    assert upstream.attempts["user@example.com"] == 2
    assert counter(relay, "deferred") == 1 and counter(relay, "ok") == 1
    assert upstream.received[0][0] == "relay@localhost"


async def test_permanent_failure_fails_that_recipient_only(relay_factory: RelayFactory) -> None:
    upstream = ScriptedUpstream({"gone@example.com": ["550 5.1.1 <gone@example.com>: no such "
                                                      "user"]})
    relay = await relay_factory(upstreams=scripted(upstream), queue=FAST_RETRY)
    queue_id = await send(relay, "ok@example.com", "gone@example.com")
    await wait_until(lambda: relay.spool.ids("dead") == [queue_id])
    assert [r for _, r, _ in upstream.received] == [["ok@example.com"]]
    dead = relay.spool.read(queue_id, "dead")
    assert {r.address: r.state for r in dead.recipients} == {"ok@example.com": "delivered",
                                                             "gone@example.com": "failed"}
    assert dead.dead_reason == "<gone@example.com>: 550 5.1.1 <gone@example.com>: no such user"
    # the count follows the move into dead/ once the thread that moved it hands back
    await wait_until(lambda: relay.scheduler.counts()["dead"] == 1)  # type: ignore[union-attr]
    assert counter(relay, "failed") == 1


async def test_mixed_results_retry_only_the_deferred_recipient(
        relay_factory: RelayFactory) -> None:
    upstream = ScriptedUpstream({"slow@example.com": ["450 4.2.1 mailbox busy", "250 ok"]})
    relay = await relay_factory(upstreams=scripted(upstream), queue=FAST_RETRY)
    queue_id = await send(relay, "fast@example.com", "slow@example.com")
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    assert [r for _, r, _ in upstream.received] == [["fast@example.com"], ["slow@example.com"]]
    assert upstream.attempts == {"fast@example.com": 1, "slow@example.com": 2}


async def test_message_older_than_max_age_becomes_a_dead_letter_with_the_last_reply(
        relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FrozenClock.frozen(monkeypatch)
    upstream = ScriptedUpstream({"user@example.com": ["421 4.7.0 server busy"]})
    relay = await relay_factory(upstreams=scripted(upstream),
                                queue={"retry_initial": "30s", "retry_max": "30s",
                                       "max_age": "100s"})
    queue_id = await send(relay)
    await wait_until(lambda: upstream.attempts.get("user@example.com") == 1)
    clock.now += 34  # the second attempt, within max_age: deferred again
    await _wake_and_settle(relay)
    await wait_until(lambda: upstream.attempts.get("user@example.com") == 2)
    clock.now += 80  # the third, past max_age: a dead letter
    await _wake_and_settle(relay)
    await wait_until(lambda: relay.spool.ids("dead") == [queue_id])
    dead = relay.spool.read(queue_id, "dead")
    assert dead.dead_reason is not None
    assert "queue.max_age" in dead.dead_reason and "421 4.7.0 server busy" in dead.dead_reason
    assert dead.attempts == 3 and upstream.attempts == {"user@example.com": 3}


async def test_whole_message_failure_defers_every_recipient(relay_factory: RelayFactory) -> None:
    from relay.errors import UpstreamUnreachable

    upstream = ScriptedUpstream()
    upstream.message_failure = UpstreamUnreachable("connection refused by smtp.example.com:587")
    relay = await relay_factory(upstreams=scripted(upstream), queue=FAST_RETRY)
    queue_id = await send(relay, "a@example.com", "b@example.com")
    await wait_until(lambda: counter(relay, "deferred") >= 2)
    upstream.message_failure = None
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    assert sorted(r for _, rs, _ in upstream.received for r in rs) == ["a@example.com",
                                                                       "b@example.com"]


async def test_bug_in_the_upstream_code_defers_instead_of_losing(
        relay_factory: RelayFactory) -> None:
    upstream = ScriptedUpstream()
    upstream.message_failure = ZeroDivisionError("oops")
    relay = await relay_factory(upstreams=scripted(upstream), queue=FAST_RETRY)
    queue_id = await send(relay)
    def deferred_with_reason() -> bool:
        try:
            return "internal error" in (relay.spool.read(queue_id, "queue").last_reply or "")
        except FileNotFoundError:
            return False

    await wait_until(deferred_with_reason)
    upstream.message_failure = None
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    assert len(upstream.received) == 1


def test_backoff_doubles_up_to_retry_max(tmp_path: Path) -> None:
    from relay.delivery.scheduler import Scheduler
    from relay.metrics import Metrics
    from relay.spool.store import Spool

    settings = Settings(state_dir=tmp_path, queue={"retry_initial": "30s", "retry_max": "15m"})
    scheduler = Scheduler.__new__(Scheduler)
    scheduler.settings = settings
    delays = [scheduler.backoff(n) for n in range(1, 10)]
    expected = [30, 60, 120, 240, 480, 900, 900, 900, 900]
    for got, want in zip(delays, expected, strict=True):
        assert want * 0.9 <= got <= want * 1.1
    del Spool, Metrics


async def test_inactive_account_holds_mail_until_activated(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    state = tmp_path / "state"
    config.write_text(f'state_dir = "{state}"\n[listener]\nport = 0\n'
                      '[system_account]\nactive = false\n')
    relay = Relay(load_settings(config), config)
    await relay.start()
    try:
        await send(relay)
        await asyncio.sleep(0.3)
        assert outbox_files(state) == []
        assert relay.scheduler.counts()["held"] == 1  # type: ignore[union-attr]
        config.write_text(config.read_text().replace("active = false", "active = true"))
        assert relay.reload()
        await wait_until(lambda: len(outbox_files(state)) == 1)
        assert relay.scheduler.counts()["held"] == 0  # type: ignore[union-attr]
    finally:
        await relay.stop(grace=1)


async def test_bad_configuration_on_reload_keeps_the_running_one(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "s"}"\n[listener]\nport = 0\n')
    relay = Relay(load_settings(config), config)
    await relay.start()
    try:
        config.write_text(config.read_text() + "[queue]\nmax_age = \"never\"\n")
        assert not relay.reload()
        assert relay.metrics.config_reloads.labels("error")._value.get() == 1
        await send(relay)
        await wait_until(lambda: len(outbox_files(tmp_path / "s")) == 1)
    finally:
        await relay.stop(grace=1)


async def test_a_changed_event_loop_is_kept_until_a_restart_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "s"}"\n[listener]\nport = 0\n')
    relay = Relay(load_settings(config), config)
    await relay.start()
    try:
        config.write_text('event_loop = "uvloop"\n' + config.read_text())
        with caplog.at_level(logging.WARNING, logger="relay.app"):
            assert relay.reload()
        assert "event_loop changed: restart the relay to run on uvloop" in caplog.text
        await send(relay)  # the running loop goes on carrying mail
        await wait_until(lambda: len(outbox_files(tmp_path / "s")) == 1)
    finally:
        await relay.stop(grace=1)


async def test_stop_puts_a_delivery_in_flight_back_without_counting_a_crash(
        relay_factory: RelayFactory, state_dir: Path) -> None:
    upstream = ScriptedUpstream()
    upstream.gate = asyncio.Event()  # the upstream never answers
    relay = await relay_factory(upstreams=scripted(upstream))
    queue_id = await send(relay)
    await wait_until(lambda: relay.spool.ids("active") == [queue_id])
    await relay.stop(grace=0.2)
    assert relay.spool.ids("queue") == [queue_id]
    assert relay.spool.read(queue_id, "queue").crashes == 0


async def test_messages_left_in_the_spool_are_delivered_at_the_next_start(
        relay_factory: RelayFactory, state_dir: Path) -> None:
    held = await relay_factory(system_account={"active": False})
    ids = [await send(held) for _ in range(3)]
    await held.stop(grace=1)
    relay = await relay_factory()
    await wait_until(lambda: len(outbox_files(state_dir)) == 3)
    names = " ".join(p.name for p in outbox_files(state_dir))
    assert all(queue_id in names for queue_id in ids)
    assert relay.spool.ids("queue") == []


async def test_an_upstream_that_wants_the_bytes_gets_a_small_message_in_memory(
        relay_factory: RelayFactory) -> None:
    from relay.spool.store import INLINE_BYTES

    upstream = ScriptedUpstream(wants_data=True)
    relay = await relay_factory(upstreams=scripted(upstream))
    large = MESSAGE[:-3] + (b"y" * 998 + b"\r\n") * (INLINE_BYTES // 1000 + 1) + b".\r\n"
    client = await RawSMTP.connect(listener_port(relay))
    await client.cmd("EHLO app.example.com")
    for body in (MESSAGE, large):
        assert (await client.transaction(body, rcpts=("user@example.com",))).startswith("250")
    await client.close()
    await wait_until(lambda: len(upstream.received) == 2)
    assert upstream.data_given == [True, False]  # a large one it reads from the file
    sizes = sorted(len(data) for _, _, data in upstream.received)
    assert sizes[1] > INLINE_BYTES


async def test_listener_accepts_while_a_large_queue_is_indexed_and_all_is_sent(
        relay_factory: RelayFactory, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from relay.delivery.index import QueueIndex
    from relay.spool.store import Envelope, Recipient, Spool, new_queue_id

    spool = Spool(state_dir / "spool")
    spool.open()
    waiting = [Envelope(id=new_queue_id(), sender="app@example.com",
                        recipients=[Recipient("user@example.com")], mail_from="x@example.com")
               for _ in range(3000)]
    assert spool.store_batch([(env, b"Subject: old\r\n\r\nqueued before the start\r\n")
                              for env in waiting]) == [None] * len(waiting)
    gate = threading.Event()
    real = QueueIndex.read

    def slow(self: QueueIndex, ids: list[str]) -> object:
        gate.wait(30)  # the index is still being read while the test sends
        return real(self, ids)

    monkeypatch.setattr(QueueIndex, "read", slow)
    upstream = ScriptedUpstream()
    relay = await asyncio.wait_for(relay_factory(upstreams=scripted(upstream)), 5)
    queue_id = await send(relay)  # accepted while nothing of the queue is indexed yet
    assert upstream.received == []
    gate.set()
    await wait_until(lambda: len(upstream.received) == 3001, within=30)
    # the upstream has it; its entry is removed after that, in the spool's thread
    await wait_until(lambda: relay.spool.find(queue_id) is None)


class FrozenClock:
    """The scheduler's `time` module with a wall clock the test moves: due times and
    backoffs are compared with it, so the test counts attempts, never measures time."""

    def __init__(self) -> None:
        self.now = time.time()
        self.monotonic = time.monotonic

    def time(self) -> float:
        return self.now

    @classmethod
    def frozen(cls, monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
        """A clock that the scheduler and its attempts and index read, for this test."""
        import relay.delivery.attempt
        import relay.delivery.index
        import relay.delivery.scheduler

        clock = cls()
        for module in (relay.delivery.scheduler, relay.delivery.attempt, relay.delivery.index):
            monkeypatch.setattr(module, "time", clock)
        return clock


async def _wake_and_settle(relay: Relay, times: int = 1) -> None:
    """Wake the scheduler `times` times and wait until no delivery is running."""
    scheduler = relay.scheduler
    assert scheduler is not None
    for _ in range(times):
        scheduler.wake()
        for _ in range(3):  # the run loop resumes, dispatches, the task starts
            await asyncio.sleep(0)
        await wait_until(lambda: scheduler.counts()["active"] == 0)


@pytest.mark.parametrize("where", ["rename", "read"])
async def test_a_spool_error_on_claim_backs_off_exponentially_and_is_logged_once(
        relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch, state_dir: Path,
        caplog: pytest.LogCaptureFixture, where: str) -> None:
    """EIO (or EACCES, ENOSPC) when a delivery takes its entry (the rename into active/,
    or reading its envelope there): not a spin of thousands of claims a second with an
    exception nobody retrieves, nor a quarantine, but a deferral like a 4xx."""
    import threading

    clock = FrozenClock.frozen(monkeypatch)
    claims: list[str] = []
    failing = [True]
    if where == "rename":
        real_rename = os.rename

        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst).parent.name == "active" and Path(src).parent.name == "queue":
                claims.append(Path(src).name)
                if failing[0]:
                    raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "rename", rename)
    else:
        real_open = os.open
        main = threading.get_ident()

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if (isinstance(path, (str, Path)) and Path(path).parent.name == "active"
                    and threading.get_ident() != main):  # the delivery's claim, in its thread
                claims.append(Path(path).name)
                if failing[0]:
                    raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    upstream = ScriptedUpstream()
    relay = await relay_factory(upstreams=scripted(upstream),
                                queue={"retry_initial": "30s", "retry_max": "15m"})
    queue_id = await send(relay)
    await wait_until(lambda: len(claims) >= 1)
    for _ in range(50):  # fifty turns of the event loop
        await asyncio.sleep(0)
    assert len(claims) == 1, f"{len(claims)} claims of one entry in 50 turns of the loop"
    await _wake_and_settle(relay, times=20)  # nothing is due: twenty wake-ups, no claim
    assert claims == [queue_id]

    def complaints() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "relay.delivery"
                and r.levelno >= logging.ERROR and queue_id in r.getMessage()]

    (first,) = complaints()
    assert "cannot take the message from the spool" in first.getMessage()
    assert "Input/output error [EIO]" in first.getMessage()
    assert "check the file system" in first.getMessage()
    assert relay.spool.ids("queue") == [queue_id] and relay.spool.ids("active") == []
    assert os.listdir(state_dir / "spool" / "quarantine") == []
    assert relay.scheduler.counts()["deferred"] == 1  # type: ignore[union-attr]

    clock.now += 34  # past retry_initial (30 s, 10 % jitter): the second try
    await _wake_and_settle(relay, times=3)
    assert claims == [queue_id] * 2
    clock.now += 34  # not yet past the doubled delay (60 s)
    await _wake_and_settle(relay, times=3)
    assert claims == [queue_id] * 2
    clock.now += 34  # now past it: the third try
    await _wake_and_settle(relay, times=3)
    assert claims == [queue_id] * 3
    assert len(complaints()) == 1  # once for this entry and cause, not at each try

    failing[0] = False  # the disk is repaired
    clock.now += 140  # past the fourth delay (120 s)
    await _wake_and_settle(relay)
    await wait_until(lambda: len(upstream.received) == 1)
    await wait_until(lambda: relay.spool.find(queue_id) is None)
    assert claims == [queue_id] * 4
    assert f"{queue_id}: the spool works again for this message" in caplog.text


async def test_a_delivery_touches_the_spool_only_from_threads_in_two_hops(
        relay_factory: RelayFactory, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim and read of a small message in one thread hop, removal in another; no
    file-system call of the delivery on the event loop (where it stalls every session)."""
    import threading

    upstream = ScriptedUpstream(wants_data=True)  # the message is read with its claim
    relay = await relay_factory(upstreams=scripted(upstream))
    loop_thread = threading.get_ident()
    spool_root = str(state_dir / "spool")
    on_loop: list[str] = []

    def watch(name: str, real: Any) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread and not isinstance(path, int):
                named = os.fsdecode(path)
                if named.startswith(spool_root) or kwargs.get("dir_fd") is not None:
                    on_loop.append(f"os.{name}({named})")
            return real(path, *args, **kwargs)
        return call

    for name in ("open", "rename", "replace", "stat", "unlink"):
        monkeypatch.setattr(os, name, watch(name, getattr(os, name)))
    hops: list[tuple[str, object]] = []  # trips to a thread: asyncio's, or the scheduler's
    real_to_thread = asyncio.to_thread

    async def to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append((getattr(func, "__name__", repr(func)), args[0] if args else None))
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    disk = relay.scheduler._disk  # type: ignore[union-attr]
    real_run = disk.run

    async def run(call: Any) -> Any:
        hops.append((call.func.__name__, call.args[-1]))  # (spool, upstream,) queue id
        return await real_run(call)

    monkeypatch.setattr(disk, "run", run)
    queue_id = await send(relay)
    await wait_until(lambda: len(upstream.received) == 1)
    await wait_until(lambda: relay.spool.ids("active") == [] and relay.spool.ids("queue") == [])
    assert upstream.data_given == [True]
    assert on_loop == []
    assert [name for name, first in hops if first == queue_id] == ["claim", "finish"]
    assert relay.spool.find(queue_id) is None


async def mount(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("mount", *args)
    assert await proc.wait() == 0


async def test_a_read_only_spool_defers_the_message_until_it_is_writable_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A real condition, no injected fault: the spool turns read-only (ext4's
    errors=remount-ro after an I/O error does this to a whole file system; here a
    read-only bind mount of the spool, since the relay keeps its lock file open for
    writing beside it, and a file system with a file open for writing cannot be
    remounted read-only by hand)."""
    caplog.set_level(logging.DEBUG, logger="relay.delivery")
    clock = FrozenClock.frozen(monkeypatch)
    upstream = ScriptedUpstream()
    state = tmp_path / "state"
    sections: dict[str, Any] = {"queue": {"retry_initial": "30s", "retry_max": "15m"}}
    relay = Relay(settings_for(state, system_account={"active": False}, **sections),
                  upstreams=scripted(upstream))
    await relay.start()
    try:
        queue_id = await send(relay)  # held: the account is inactive
        spool = str(relay.spool.root)
        await mount("--bind", spool, spool)
        await mount("-o", "remount,bind,ro", spool)
        try:
            assert relay.scheduler is not None
            relay.scheduler.reconfigure(settings_for(state, **sections))  # Activate
            await wait_until(lambda: any(queue_id in r.getMessage() and "EROFS" in r.getMessage()
                                         for r in caplog.records))
            await _wake_and_settle(relay, times=20)
            clock.now += 34  # past the first delay: one more try, no second error line
            await _wake_and_settle(relay, times=3)
            tries = [r for r in caplog.records if queue_id in r.getMessage()
                     and "Read-only file system [EROFS]" in r.getMessage()]
            assert [r.levelname for r in tries] == ["ERROR", "DEBUG"]
            assert upstream.received == []
        finally:
            await mount("-o", "remount,bind,rw", spool)
            proc = await asyncio.create_subprocess_exec("umount", spool)
            assert await proc.wait() == 0
        clock.now += 70  # past the doubled delay
        await _wake_and_settle(relay)
        await wait_until(lambda: len(upstream.received) == 1)
        await wait_until(lambda: relay.spool.find(queue_id) is None)
    finally:
        await relay.stop(grace=1)


async def test_stop_while_a_claim_runs_in_its_thread_puts_the_entry_back(
        relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim runs in a thread, which a cancelled delivery cannot stop: what it has
    claimed by the time it ends goes back to the queue, not counted as a crash."""
    import threading

    entered, gate = threading.Event(), threading.Event()
    real_rename = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).parent.name == "active" and Path(src).parent.name == "queue":
            entered.set()
            gate.wait(10)  # the disk is slow: the claim is still running at the stop
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    upstream = ScriptedUpstream()
    relay = await relay_factory(upstreams=scripted(upstream))
    queue_id = await send(relay)
    await wait_until(entered.is_set)
    task = relay.scheduler._inflight[queue_id]  # type: ignore[union-attr]
    stopping = asyncio.create_task(relay.stop(grace=0.05))
    await wait_until(lambda: task.cancelling() > 0)
    gate.set()
    await stopping
    assert relay.spool.ids("queue") == [queue_id] and relay.spool.ids("active") == []
    assert relay.spool.read(queue_id, "queue").crashes == 0
    assert upstream.received == []


async def test_scheduler_sleeps_while_its_pool_is_full(relay_factory: RelayFactory) -> None:
    """More due messages than deliveries may run: the scheduler waits for one to finish
    instead of waking on a 0 s timer at every turn of the event loop (which took half
    the delivery's CPU under load)."""
    upstream = ScriptedUpstream()
    upstream.gate = asyncio.Event()
    relay = await relay_factory(upstreams=scripted(upstream))
    scheduler = relay.scheduler
    assert scheduler is not None
    for _ in range(scheduler._capacity + 3):
        await send(relay)
    await wait_until(lambda: len(scheduler._inflight) == scheduler._capacity)
    dispatched = 0
    dispatch = scheduler._dispatch

    def counted() -> float | None:
        nonlocal dispatched
        dispatched += 1
        return dispatch()

    scheduler._dispatch = counted  # type: ignore[method-assign]
    for _ in range(200):  # turns of the event loop, with nothing finishing meanwhile
        await asyncio.sleep(0)
    assert dispatched == 0
    upstream.gate.set()
    await wait_until(lambda: len(upstream.received) == scheduler._capacity + 3)


async def test_a_message_queued_while_the_queue_is_re_read_stays_indexed(
        relay_factory: RelayFactory) -> None:
    """A re-read of the queue (SIGUSR1, or after an intake worker died) forgets what is
    no longer on disk, not what was queued while it was reading."""
    relay = await relay_factory(system_account={"active": False})  # held: nothing is sent
    scheduler = relay.scheduler
    assert scheduler is not None
    first = await send(relay)
    await wait_until(lambda: first in scheduler.index)
    loop = asyncio.get_running_loop()
    scan = relay.spool.scan
    during: list[str] = []

    def slow_scan(place: Any) -> Any:
        listing = list(scan(place))  # read before the next message is queued
        during.append(asyncio.run_coroutine_threadsafe(send(relay), loop).result(10))
        return iter(listing)

    relay.spool.scan = slow_scan  # type: ignore[method-assign]
    await relay.rescan()
    assert during and during[0] in scheduler.index
    assert first in scheduler.index
