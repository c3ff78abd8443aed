"""Power cuts and the moves between the spool's places: no claim lost, no delivery repeated.

PowerFS (tests/spool/powerfs.py) makes a rename durable once its source or target
directory is fsynced; with `split_renames`, each half only with its own directory, as
where renames are not atomic across a crash. Each test drives one move into a known
state, cuts the power, and starts the spool on what survived as `serve` does
(`recover`):

- a delivery's claim (queue/ -> active/) is made durable by the claim-sync thread's
  fsync of active/ (soon after the claim; the delivery does not wait for it): from then
  on a later fsync of queue/ (the next message's commit) can no longer make the entry
  vanish from both places;
- a delivered entry's move out of active/ is made durable by the remover thread, so
  the message does not come back as an interrupted delivery, to be sent again;
- an entry that a split rename left under two names is kept once, in queue/.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.app import Relay
from relay.spool import Envelope, Recipient, Spool, new_queue_id, recover
from tests.delivery.test_delivery import scripted, send
from tests.support import ScriptedUpstream, settings_for, wait_until

from .powerfs import PowerMount, mounted


def stored(spool: Spool) -> str:
    env = Envelope(id=new_queue_id(), sender="app@example.com",
                   recipients=[Recipient("user@example.com")], size=20)
    spool.store(env, b"Subject: cut\r\n\r\nhi\r\n")
    return env.id


def survivors(mount: PowerMount, image: Path, spool_dir: str = "spool") -> Spool:
    """Cut the power, and start a spool on what survived (as `serve` does)."""
    mount.save(image)
    spool = Spool(image / spool_dir)
    spool.open()
    recover(spool, max_crashes=100)
    return spool


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[PowerMount]:
    with mounted(tmp_path / "mnt", split_renames=True) as mount:
        yield mount


async def test_a_claimed_message_survives_a_cut_after_the_next_commit_syncs_the_queue(
        mount: PowerMount, tmp_path: Path) -> None:
    upstream = ScriptedUpstream()
    upstream.gate = asyncio.Event()  # the upstream does not answer: the entry stays claimed
    relay = Relay(settings_for(mount.mountpoint / "state"), upstreams=scripted(upstream))
    await relay.start()
    try:
        active = relay.spool.place_dir("active")
        first = await send(relay)
        await wait_until(lambda: os.listdir(active) == [first])
        assert relay.scheduler is not None
        assert await asyncio.to_thread(relay.scheduler.claim_sync.wait)  # the claim synced
        second = await send(relay)  # its commit fsyncs queue/: the claim's first half is durable
        mount.cut()
    finally:
        upstream.gate.set()
        with contextlib.suppress(OSError):  # the power is off: the relay's last writes fail
            await relay.stop(grace=1)
        if relay.lock.held:  # its pid file could not be removed: the lock is still open
            relay.lock.release()
    spool = await asyncio.to_thread(survivors, mount, tmp_path / "image", "state/spool")
    assert spool.ids("queue") == sorted([first, second])  # neither lost, each once
    assert spool.ids("active") == []


async def test_a_delivered_message_does_not_come_back_after_a_power_cut(
        tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", split_renames=False) as mount:
        spool = Spool(mount.mountpoint / "spool")
        spool.open()
        delivered, waiting = stored(spool), stored(spool)
        assert spool.claim(delivered) is not None
        spool.finish(delivered)
        assert spool.removed()
        after = survivors(mount, tmp_path / "image")
    assert after.ids("queue") == [waiting]
    assert after.ids("active") == []


def test_an_entry_a_split_rename_left_under_two_names_is_kept_once(
        mount: PowerMount, tmp_path: Path) -> None:
    spool = Spool(mount.mountpoint / "spool")
    spool.open()
    queue_id = stored(spool)
    assert spool.claim(queue_id) is not None  # active/ synced, queue/ not: both names kept
    after = survivors(mount, tmp_path / "image")
    assert after.ids("queue") == [queue_id]
    assert after.ids("active") == []
    found = after.find(queue_id)
    assert found is not None and found[1].crashes == 0
