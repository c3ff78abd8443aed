"""Removing from the spool: delivered entries and abandoned receptions, in a thread.

`Remover` is the thread that deletes what `Spool.finish` moved into trash/ and what a
discarded reception wrote into incoming/, so no session or delivery waits for it.
Each batch first fsyncs, once, every place a delivered entry left in it (active/,
or edit/ for `queue delete`): the move out is then durable, and a power cut does
not bring a delivered message back as an interrupted delivery, to be sent again.
The delivery does not wait for that sync: a cut before it can still send the last
few messages twice (at least once, never zero times). `remove_tree` is start-up's
removal of whatever it finds in incoming/ and trash/.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from relay.spool.batches import Worker
from relay.spool.files import ENVELOPE, MESSAGE, fsync_dir

log = logging.getLogger("relay.spool")

Removal = tuple[Callable[[], None], Path | str | None]
"""A removal for the `Remover`, and the place to sync before it (None: none)."""


class Remover(Worker[Removal]):
    NAME = "spool-remove"

    def handle(self, batch: list[Removal]) -> None:
        for place in {place for _, place in batch if place is not None}:
            try:
                fsync_dir(place)
            except OSError as e:
                log.warning("cannot sync %s (%s): after a power cut, messages delivered just "
                            "now may be delivered again; check the file system (free space, "
                            "I/O errors in the kernel log)", place, e.strerror)
        for job, _ in batch:
            job()


def remove_entry(entry: Path | str, marks: list[Path] | list[str]) -> None:
    """Remove a finished entry (a file, or a directory of the earlier layout), then the
    envelope saved beside it and its marks (`marks`: those files, which may not exist)."""
    try:
        os.unlink(entry)
    except IsADirectoryError:
        try:  # the files an entry of the earlier layout has; anything else: the slow way
            os.unlink(os.path.join(entry, MESSAGE))
            os.unlink(os.path.join(entry, ENVELOPE))
            os.rmdir(entry)
        except OSError:
            shutil.rmtree(entry, ignore_errors=True)
    except OSError:
        pass
    for path in marks:
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_tree(path: Path) -> None:
    """Remove a file, or a directory tree; a symbolic link is removed itself, its target
    untouched."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
