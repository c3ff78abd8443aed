"""Whether state_dir's file system keeps what the spool relies on across a power cut.

The spool's promise (every 250 survives a power cut) needs a file system that makes a
rename durable whole: one that journals its metadata (ext4 with its journal, xfs,
btrfs). `durability_warning` names the two cases Linux lets us see: ext2/3/4 mounted
without a journal (no `/proc/fs/jbd2/DEVICE-*`), where a message being delivered can be
lost at a power cut (docs/reliability.md, "Renames by halves"), and a file system in
memory (tmpfs, ramfs), where nothing survives one. It reads /proc and /sys only; where
they say nothing (another system, a container without them), it says nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

_EXT = {"ext2", "ext3", "ext4"}
_MEMORY = {"tmpfs", "ramfs"}


def durability_warning(state_dir: Path, proc: Path = Path("/proc"),
                       sys_dir: Path = Path("/sys")) -> str | None:
    """The warning for state_dir's file system, or None."""
    place = _existing(state_dir)
    try:
        device = os.stat(place).st_dev
        mounts = (proc / "self" / "mountinfo").read_text()
    except OSError:
        return None
    numbers = f"{os.major(device)}:{os.minor(device)}"
    found = _mount(mounts, numbers, str(place.resolve()))
    if found is None:
        return None
    point, fstype, source = found
    where = f"state_dir {state_dir} is on {fstype} ({source} at {point})"
    if fstype in _MEMORY:
        return (f"{where}, in memory: queued mail does not survive a reboot or power cut; "
                "put state_dir on a disk")
    if fstype not in _EXT:
        return None
    try:
        name = os.readlink(sys_dir / "dev" / "block" / numbers).rsplit("/", 1)[-1]
        journals = os.listdir(proc / "fs" / "jbd2")
    except OSError:
        return None
    if any(j.rpartition("-")[0] == name for j in journals):
        return None
    return (f"{where} without a journal: a power cut while a message is being delivered "
            "can lose it (docs/reliability.md); put state_dir on a file system that "
            "journals its metadata (ext4 with its journal, xfs, btrfs)")


def _existing(path: Path) -> Path:
    """path, or its nearest parent that exists (state_dir may not exist yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _mount(mountinfo: str, numbers: str, path: str) -> tuple[str, str, str] | None:
    """(mount point, type, source) of device MAJ:MIN in mountinfo: of its mounts, the one
    whose mount point is the longest that holds `path` (else the last one listed)."""
    found: list[tuple[str, str, str]] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[2] != numbers or "-" not in fields[6:]:
            continue
        rest = fields[fields.index("-", 6) + 1:]
        if len(rest) >= 2:
            found.append((_unescape(fields[4]), rest[0], _unescape(rest[1])))
    holding = [m for m in found
               if path == m[0] or path.startswith(m[0].rstrip("/") + "/")]
    if holding:
        return max(holding, key=lambda m: len(m[0]))
    return found[-1] if found else None


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
