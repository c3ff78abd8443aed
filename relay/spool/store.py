"""The spool: every accepted message on disk until the upstream has it.

An entry is one file (`relay.spool.files` gives its format): a header holding the
envelope (sender, recipients and their states, attempts) as it was at the commit,
then the message (the client's bytes; the rewrite is applied when it is sent,
`Envelope.as_received`). A later envelope is saved atomically in envelopes/ID
and read instead of the header's; the entry's file is never written again.
Entries of the earlier layout (a directory holding `message` and `envelope.json`)
are read, moved and removed the same way. Where the entry sits is its state:

    incoming/ID    being received or committed; removed at start-up (the client
                   never got 250) and when a reception is abandoned
    queue/ID       waiting for delivery (queued, deferred or held)
    active/ID      claimed by a delivery; put back at start-up (a crash), counted
    edit/ID        claimed by `queue retry`; put back at start-up
    dead/ID        dead letter, with the reason in the envelope
    quarantine/ID  damaged entries moved aside (with their saved envelope), never deleted
    trash/ID       delivered: being deleted (in a thread); all deleted at start-up
    envelopes/ID   the envelope saved since the commit, if it changed; ID.MARK the
                   marks of `mark_once`; removed with the entry (at start-up, those
                   whose entry is gone)

A message is written into incoming/ as it arrives (`Incoming`), made durable with
one fdatasync and renamed into queue/ by `Spool.commit` (relay.spool.incoming gives
the durability argument): only then does the client get 250. A delivery claims
an entry by renaming it into active/, so two deliveries (or the daemon and the
command line) never hold the same entry. The claim is made durable by an fsync of
active/ right after the rename (`claim` syncs its own; a delivery thread that
`take`s a batch calls `sync` once for all): where a rename is not atomic across a
crash (ext4, xfs and btrfs journal it whole), only a power cut between the rename
and that sync, after someone fsyncs queue/, could lose the entry. Nothing is removed
before the upstream has accepted it; a delivered entry's move out of active/ is made
durable by the remover thread, once per batch (relay.spool.removal). Damaged
entries go to quarantine/ (relay.spool.quarantine). Directories are 0700 and files
0600; an entry that is a symbolic link, or whose saved envelope (or, in the earlier
layout, message or envelope) is one, is quarantined when it is claimed or recovered,
never followed (its target is neither sent nor truncated). `read` takes an entry
from one open file (or directory), so an entry that moves meanwhile is read whole or
not found, never called damaged. Every method here waits for the disk: call it from
a thread (the scheduler does, once to claim and read a message, once to finish it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from relay.errors import DamagedEntry, SpoolError
from relay.spool import entries, quarantine, state
from relay.spool.entries import Claimed as Claimed
from relay.spool.envelope import Envelope as Envelope
from relay.spool.envelope import Recipient as Recipient
from relay.spool.envelope import RecipientState as RecipientState
from relay.spool.envelope import new_queue_id as new_queue_id
from relay.spool.files import fsync_dir
from relay.spool.files import read_regular as read_regular
from relay.spool.incoming import Incoming as Incoming
from relay.spool.incoming import Intake
from relay.spool.removal import Remover, remove_entry
from relay.spool.removal import remove_tree as remove_tree

Place = Literal["queue", "active", "dead", "edit"]
ENVELOPES = "envelopes"
MARKS = ("notified",)
"""What `mark_once` records beside an entry (the dead-letter report was queued)."""
_DIRS = ("incoming", "queue", "active", "edit", "dead", "quarantine", "trash", ENVELOPES)

INLINE_BYTES = 1 << 20
"""Messages up to this size are read whole when they are claimed (in the same thread),
larger ones a chunk at a time as they are sent."""


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs = {name: os.path.join(root, name) for name in _DIRS}
        """Each place's directory as a string: the delivery's calls join names to these
        (a Path per call cost a tenth of the delivery thread's time)."""
        self._remover = Remover()
        self.intake = Intake(root, self._remover)

    def place_dir(self, place: str) -> Path:
        return self.root / place

    def open(self) -> None:
        """Create the directories (0700, never through a symbolic link), make their names
        durable (fsync of the spool and of its parent) and prove we can write there.
        Raises SpoolError."""
        try:
            state.private_dir(self.root)
            for name in _DIRS:
                state.private_dir(self.root / name)
            # queue/ and the others are durable in the spool, and the spool in its
            # parent, only once those are fsynced: private_dir does it for what it
            # makes, this for what a run stopped before its sync may have left.
            fsync_dir(self.root)
            fsync_dir(self.root.parent)
            probe = self.place_dir("incoming") / f".probe-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):  # a power cut can leave one made
                probe.unlink()                            # with our pid (pids repeat at boot)
            os.close(state.open_private(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            probe.unlink()
        except OSError as e:
            raise SpoolError(
                f"the spool directory {self.root} is not usable: {e.strerror}; "
                "make it writable by the relay's user or set state_dir"
            ) from None

    # --- accepting (relay.spool.incoming) --------------------------------------------

    def receive(self, queue_id: str) -> Incoming:
        """A new message, to be written into with `Incoming.write` and then `commit`ted."""
        return self.intake.receive(queue_id)

    async def commit(self, envelope: Envelope, message: Incoming) -> None:
        """Make a received message durable in queue/ under `envelope`. Raises SpoolError
        (and nothing is left behind). Returns once it is durable: the argument is
        relay.spool.incoming's."""
        await self.intake.commit(envelope, message)

    def store(self, envelope: Envelope, data: bytes) -> None:
        """`commit` of a message already in memory, in this thread (which waits for the disk)."""
        (error,) = self.store_batch([(envelope, data)])
        if error is not None:
            raise error

    def store_batch(self, items: list[tuple[Envelope, bytes]]) -> list[SpoolError | None]:
        """`store` for several messages, sharing the directory sync; one result each."""
        return self.intake.store_batch(items)

    def close(self) -> None:
        """Wait for writes in progress and stop their threads (a later one starts them again)."""
        self.intake.close()

    # --- delivering ------------------------------------------------------------------

    def claim(self, queue_id: str, src: Place = "queue", dst: Place = "active") -> Envelope | None:
        """Take an entry by renaming it, durably (`sync` of `dst`); None if someone else
        took or deleted it.

        A damaged entry raises DamagedEntry (in `dst`, for quarantine). When the system
        refuses to read it (an I/O error, permissions, no file descriptor left: nothing
        says the entry is damaged) it goes back to `src` and SpoolError says why."""
        taken = self.take(queue_id, src=src, dst=dst)
        if taken is not None:
            self.sync(dst)
        return None if taken is None else taken.envelope

    def take(self, queue_id: str, inline: int = -1, src: Place = "queue",
             dst: Place = "active") -> Claimed | None:
        """`claim`, and where its message is; with its bytes too when the message is not
        larger than `inline` (read through the same open file, in this thread). The
        caller makes it durable: `sync(dst)`, once for a batch of takes."""
        entry = os.path.join(self._dirs[src], queue_id)
        taken = os.path.join(self._dirs[dst], queue_id)
        try:
            os.rename(entry, taken)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SpoolError(e.errno, e.strerror, entry) from e
        try:
            saved = os.path.join(self._dirs[ENVELOPES], queue_id)
            mode = entries.refuse_link(taken, saved)
            return entries.read_entry(taken, saved, True, inline, mode)
        except FileNotFoundError:
            return None
        except SpoolError:
            raise
        except OSError as e:  # a system error while reading: untaken, not damaged
            with contextlib.suppress(OSError):
                os.rename(taken, entry)
            where = os.path.join(entry, os.fsdecode(e.filename)) if e.filename else entry
            raise SpoolError(e.errno, e.strerror, where) from e

    def sync(self, place: Place = "active") -> None:
        """Make the entries moved into `place` durable there: one fsync of its directory
        for every `take` before it. OSError when the disk refuses."""
        fsync_dir(self._dirs[place])

    def refuse_link(self, entry: Path) -> None:
        """DamagedEntry when the entry or a file of it is a symbolic link (never followed)."""
        entries.refuse_link(entry, self.saved_path(entry.name))

    def saved_path(self, queue_id: str) -> Path:
        """Where the envelope of an entry is saved once it changed after the commit."""
        return self.place_dir(ENVELOPES) / queue_id

    def message_path(self, queue_id: str, place: Place = "active") -> Path:
        """The file holding the entry's message (`entries.message_path`)."""
        return entries.message_path(self.place_dir(place) / queue_id)

    message_start = staticmethod(entries.message_start)

    def read_message(self, queue_id: str, place: Place = "active") -> bytes:
        """The message's bytes as the client sent them (without the entry's header)."""
        return entries.read_message(self.message_path(queue_id, place))

    def read(self, queue_id: str, place: Place) -> Envelope:
        return self._read(queue_id, place).envelope

    def _read(self, queue_id: str, place: Place, system_errors: bool = False,
              inline: int = -1) -> Claimed:
        return entries.read_entry(self.place_dir(place) / queue_id, self.saved_path(queue_id),
                                  system_errors, inline)

    def update(self, envelope: Envelope, place: Place = "active") -> None:
        """Save the envelope (per-recipient states, attempts) of an entry this process has
        claimed (in `place`): atomically and durably, in a file beside the spool's places,
        which `read` takes over the header's."""
        if not os.path.lexists(self.place_dir(place) / envelope.id):
            raise FileNotFoundError(errno.ENOENT, "no such entry", str(self.place_dir(place) /
                                                                        envelope.id))
        state.write_atomically(self.saved_path(envelope.id), envelope.to_json())

    def release(self, envelope: Envelope, src: Place = "active", dst: Place = "queue") -> None:
        """Save the envelope and move the entry on (back to queue/, or into dead/)."""
        self.update(envelope, src)
        os.rename(self.place_dir(src) / envelope.id, self.place_dir(dst) / envelope.id)
        fsync_dir(self.place_dir(dst))

    def put_back(self, queue_id: str, src: Place = "active") -> None:
        """Return a claimed entry to the queue unchanged: a rename, which needs no free space."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.place_dir(src) / queue_id, self.place_dir("queue") / queue_id)

    def finish(self, queue_id: str, place: Place = "active", size: int | None = None) -> None:
        """The upstream has the message (of `size` bytes, when known): remove it (in the
        remover's thread, which first makes its move out of `place` durable)."""
        trash = os.path.join(self._dirs["trash"], queue_id)
        os.rename(os.path.join(self._dirs[place], queue_id), trash)
        saved = os.path.join(self._dirs[ENVELOPES], queue_id)
        marks = [saved, *(f"{saved}.{mark}" for mark in MARKS)]
        self._remover.submit((functools.partial(remove_entry, trash, marks),
                              self._dirs[place]))

    def removed(self, timeout: float = 10.0) -> bool:
        """True once every finished entry is deleted (it happens in a thread)."""
        return self._remover.wait(timeout)

    def quarantine(self, queue_id: str, place: str, reason: str) -> None:
        """Move a damaged entry aside (relay.spool.quarantine); never raises."""
        quarantine.quarantine(self.place_dir(place) / queue_id, self.place_dir("quarantine"),
                              self.saved_path(queue_id), reason)

    def quarantined(self, queue_id: str) -> str | None:
        """Why an entry was moved to quarantine/ (its REASON), or None if it was not."""
        return quarantine.quarantined(self.place_dir("quarantine"), queue_id)

    def mark_once(self, queue_id: str, place: Place, mark: str) -> bool:
        """Record `mark` (one of MARKS) for an entry in `place`: True the first time,
        False when it was recorded before or the entry is not there. Removed with it."""
        if mark not in MARKS:
            raise ValueError(f"unknown mark {mark!r}")
        if not os.path.lexists(self.place_dir(place) / queue_id):
            return False
        try:
            os.close(state.open_private(self.place_dir(ENVELOPES) / f"{queue_id}.{mark}",
                                        os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    # --- looking ---------------------------------------------------------------------

    def ids(self, place: Place) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.place_dir(place)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def scan(self, place: Place) -> Iterator[tuple[str, Envelope | DamagedEntry]]:
        """Every entry in a place, or the DamagedEntry explaining why it cannot be read."""
        for queue_id in self.ids(place):
            try:
                yield queue_id, self.read(queue_id, place)
            except DamagedEntry as e:
                yield queue_id, e
            except FileNotFoundError:
                continue  # claimed or removed while we looked

    def find(self, queue_id: str) -> tuple[Place, Envelope] | None:
        for attempt in range(10):
            try:
                return self._find_once(queue_id)
            except FileNotFoundError:  # it moved while we read it (claimed, put back,
                if attempt == 9:       # delivered): look again from queue/
                    raise
        return None

    def _find_once(self, queue_id: str) -> tuple[Place, Envelope] | None:
        places: tuple[Place, ...] = ("queue", "active", "edit", "dead")
        for place in places:
            if os.path.lexists(self.place_dir(place) / queue_id):
                return place, self.read(queue_id, place)
        return None

    def count(self, place: Place) -> int:
        return len(self.ids(place))
