"""quarantine/: damaged entries moved aside with the reason, never deleted or followed.

An entry that cannot be read back (not a spool entry, cut short, a symbolic link
planted in the spool) is moved from its place into quarantine/ID, with the envelope
saved beside it (if any) and a REASON file saying what is wrong; `quarantined`
reads that reason back for `queue show` and the admin page. Another entry of the same
ID quarantined later goes to quarantine/ID.NANOSECONDS, so nothing is written over.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from relay.spool import state


def write_reason(entry: Path, reason: str) -> None:
    """The REASON file of a quarantined entry (private, never through a link)."""
    fd = state.open_private(entry / "REASON", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, (reason + "\n").encode("utf-8", "replace"))
    finally:
        os.close(fd)


def quarantine(src: Path, quarantine_dir: Path, saved: Path, reason: str) -> None:
    """Move the entry at `src` (a file, a directory, or anything else) into
    `quarantine_dir`, with its saved envelope `saved` if any; never raises."""
    queue_id = src.name
    dst = quarantine_dir / queue_id
    if dst.exists():
        dst = dst.with_name(f"{queue_id}.{time.time_ns()}")
    try:
        if src.is_dir() and not src.is_symlink():
            with contextlib.suppress(OSError):  # the reason arrives with the entry
                write_reason(src, reason)
            os.rename(src, dst)
        else:
            dst.mkdir(mode=0o700)
            os.rename(src, dst / queue_id)
        if not (dst / "REASON").is_file():
            write_reason(dst, reason)
        with contextlib.suppress(FileNotFoundError):
            os.rename(saved, dst / f"{saved.parent.name}.{queue_id}")
    except OSError:
        pass  # gone meanwhile, or the disk refuses: the next start finds it again


def quarantined(quarantine_dir: Path, queue_id: str) -> str | None:
    """Why an entry was moved to quarantine/ (its REASON), or None if it was not."""
    found = sorted(p for p in quarantine_dir.glob(f"{queue_id}*")
                   if p.name == queue_id or p.name.startswith(f"{queue_id}."))
    if not found:
        return None
    try:
        return (found[-1] / "REASON").read_text(errors="replace").strip()
    except OSError:
        return f"no reason recorded in {found[-1]}"
