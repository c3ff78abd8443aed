"""A delivery's claim (`Spool.take`) reads the envelope and, up to the inline size, the
message's bytes, whatever the entry's header: a small one read with the message in
one go, the room kept for a message written out as it came, an envelope beyond that
room, the envelope saved since the commit, the layout of earlier versions."""

from __future__ import annotations

import os

import pytest

from relay.errors import DamagedEntry
from relay.spool import files as spool_file
from relay.spool.store import Envelope, Incoming, Recipient, Spool, new_queue_id
from tests.support import to_old_layout

INLINE = 1 << 20


def envelope(recipients: int = 1) -> Envelope:
    return Envelope(id=new_queue_id(), sender="app@example.com",
                    recipients=[Recipient(f"{'r' * 60}{i}@example.com")
                                for i in range(recipients)],
                    mail_from="notify@example.com", size=0)


async def committed(spool: Spool, env: Envelope, pieces: list[bytes]) -> bytes:
    """Receive `pieces` as the listener hands them over and commit them; the message."""
    message = spool.receive(env.id)
    for piece in pieces:
        await message.write(bytearray(piece))
    env.size = message.size
    await spool.commit(env, message)
    return b"".join(pieces)


def taken(spool: Spool, queue_id: str, inline: int = INLINE) -> tuple[Envelope, int, bytes | None]:
    claimed = spool.take(queue_id, inline)
    assert claimed is not None
    assert claimed.path == spool.root / "active" / queue_id
    return claimed.envelope, claimed.start, claimed.data


async def test_a_small_message_comes_with_its_claim(spool: Spool) -> None:
    env = envelope()
    data = await committed(spool, env, [b"Subject: hi\r\n\r\nbody\r\n"])
    back, start, read = taken(spool, env.id)
    assert (back.id, back.size, read) == (env.id, len(data), data)
    assert (spool.root / "active" / env.id).read_bytes()[start:] == data
    assert spool.ids("queue") == [] and spool.ids("active") == [env.id]


async def test_a_message_written_out_as_it_came_comes_whole_after_its_room(
        spool: Spool) -> None:
    env = envelope()
    line = b"w" * 998 + b"\r\n"
    data = await committed(spool, env, [line] * (Incoming.BUFFER // 1000 + 3))
    back, start, read = taken(spool, env.id)
    assert start == spool_file.RESERVED
    assert (back.id, read) == (env.id, data)


async def test_an_envelope_larger_than_the_room_kept_for_it_comes_with_its_message(
        spool: Spool) -> None:
    env = envelope(recipients=400)
    assert len(env.to_json()) > spool_file.RESERVED
    line = b"e" * 998 + b"\r\n"
    data = await committed(spool, env, [line] * (Incoming.BUFFER // 1000 + 3))
    back, start, read = taken(spool, env.id)
    assert start > spool_file.RESERVED
    assert (len(back.recipients), read) == (400, data)


async def test_a_message_beyond_the_inline_size_is_left_in_its_file(spool: Spool) -> None:
    env = envelope()
    await committed(spool, env, [b"Subject: big\r\n\r\n", b"b" * 5000])
    back, start, read = taken(spool, env.id, inline=4096)
    assert (back.id, read) == (env.id, None)
    assert (spool.root / "active" / env.id).read_bytes()[start:].startswith(b"Subject: big")


async def test_the_envelope_saved_since_the_commit_is_the_one_taken(spool: Spool) -> None:
    env = envelope()
    data = await committed(spool, env, [b"Subject: again\r\n\r\nbody\r\n"])
    assert spool.claim(env.id) is not None
    env.attempts, env.last_reply = 1, "451 4.3.0 try later"
    spool.release(env)
    back, _, read = taken(spool, env.id)
    assert (back.attempts, back.last_reply, read) == (1, "451 4.3.0 try later", data)


async def test_an_entry_of_the_earlier_layout_comes_with_its_message(spool: Spool) -> None:
    env = envelope()
    data = await committed(spool, env, [b"Subject: old\r\n\r\nbody\r\n"])
    to_old_layout(spool.root / "queue" / env.id)
    claimed = spool.take(env.id, INLINE)
    assert claimed is not None
    assert (claimed.path, claimed.start, claimed.data) == (
        spool.root / "active" / env.id / "message", 0, data)


@pytest.mark.parametrize("cut", [10, 40])
async def test_an_entry_cut_short_in_its_header_is_damaged(spool: Spool, cut: int) -> None:
    env = envelope()
    await committed(spool, env, [b"Subject: cut\r\n\r\nbody\r\n"])
    entry = spool.root / "queue" / env.id
    os.truncate(entry, cut)
    with pytest.raises(DamagedEntry, match="header"):
        spool.take(env.id, INLINE)
    assert spool.ids("active") == [env.id]  # there, for quarantine
