"""A full disk: the listener says 451 and keeps going; what was queued is delivered."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from relay.admin.server import not_ready
from relay.app import Relay
from relay.settings import load_settings
from tests.support import RawSMTP, listener_port, outbox_files, wait_until

MESSAGE = b"From: App <app@example.com>\r\nSubject: Alert\r\n\r\n" + b"x" * 2000 + b"\r\n.\r\n"


def fill(path: Path) -> Path:
    """Write until the file system is full; return the filler file."""
    filler = path / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


async def send(port: int) -> str:
    client = await RawSMTP.connect(port)
    await client.cmd("EHLO app.example.com")
    reply = await client.transaction(MESSAGE)
    await client.close()
    return reply


async def test_full_disk_gives_451_then_recovers_and_delivers_everything(
        small_disk: Path, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    state = small_disk / "state"
    config.write_text(f'state_dir = "{state}"\n[listener]\nport = 0\n'
                      '[system_account]\nactive = false\n'
                      '[queue]\nretry_initial = "0.2s"\nretry_max = "0.5s"\n')
    relay = Relay(load_settings(config), config)
    await relay.start()
    try:
        port = listener_port(relay)
        queued = [await send(port) for _ in range(3)]
        assert all(r.startswith("250") for r in queued), queued

        filler = fill(small_disk)
        refused = await send(port)
        assert refused.startswith("451 4.3.0"), refused
        problems = await not_ready(relay)  # what /readyz answers, with its 503
        assert any("No space left on device" in p and "None" not in p for p in problems)
        assert os.listdir(state / "spool" / "incoming") == []
        assert len(relay.spool.ids("queue")) == 3  # nothing queued was touched

        # Activating the account while the disk is full: delivery into the outbox fails
        # too, so messages are deferred, not lost.
        config.write_text(config.read_text().replace("active = false", "active = true"))
        assert relay.reload()
        await wait_until(lambda: relay.metrics.deliveries.labels("local", "deferred")
                         ._value.get() >= 1)
        assert len(relay.spool.ids("queue")) + len(relay.spool.ids("active")) == 3

        filler.unlink()  # space returns: acceptance resumes and the queue drains by itself
        assert (await send(port)).startswith("250")
        await wait_until(lambda: len(outbox_files(state)) == 4, within=20)
        assert relay.spool.ids("queue") == [] and relay.spool.ids("dead") == []
        for path in outbox_files(state):
            assert path.read_bytes().endswith(b"x" * 2000 + b"\r\n")
    finally:
        await relay.stop(grace=1)
