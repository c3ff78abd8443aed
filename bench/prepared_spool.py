"""A spool full of queued messages, written in the relay's own format, quickly."""

from __future__ import annotations

import os
from pathlib import Path

from bench import load
from bench.relay_instance import SYSTEM_ADDRESS
from relay.spool import Envelope, Recipient, Spool, new_queue_id
from relay.spool.files import ENVELOPE, MESSAGE
from tests.peers.netutil import HOST

LINKS_PER_BODY = 10_000  # spooled message files per body copy (ext4 allows 65,000 links)


def fill_spool(state_dir: Path, count: int, size: int) -> None:
    """*count* queued messages of *size* bytes in the relay's own format, written with its
    Spool (directories) and Envelope: spool/queue/ID/{message,envelope.json}.

    Not through `Spool.store`, whose fsyncs would take minutes. The message files are
    hard links to a few copies of one body: the relay reads envelopes at start-up, and
    the disk is spared writing the same bytes again and again.
    """
    spool = Spool(state_dir / "spool")
    spool.open()
    bodies = state_dir.parent / "bodies"
    bodies.mkdir()
    data = load.message_bytes(size)
    queue = spool.root / "queue"
    body = bodies / "0"
    for i in range(count):
        if i % LINKS_PER_BODY == 0:
            body = bodies / str(i)
            body.write_bytes(data)
        env = Envelope(id=new_queue_id(), sender=load.SENDER,
                       recipients=[Recipient(load.RECIPIENT)], mail_from=SYSTEM_ADDRESS,
                       size=len(data), client=HOST, subject=f"bench {i}")
        entry = queue / env.id
        entry.mkdir(mode=0o700)
        os.link(body, entry / MESSAGE)
        (entry / ENVELOPE).write_bytes(env.to_json())
    os.sync()  # no writeback of the new spool during the measurement
