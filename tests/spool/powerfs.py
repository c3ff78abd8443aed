"""PowerFS: a FUSE file system that forgets, at a power cut, all that was not synced.

It keeps the whole tree in memory, twice:

- the *volatile* view, what processes see: every write, truncate, create, mkdir,
  rename and unlink takes effect at once, as in the page cache;
- the *durable* view, what a disk would hold: a file's bytes (and so its length)
  become durable only when that file is fsync'ed or fdatasync'ed; a change of names
  (a file or directory made, removed, or renamed) only when a directory it changes
  is fsync'ed. A rename is one change: the old name goes and the new one comes
  together, when the source or the target directory is synced. With
  `split_renames` its two halves are two changes: the old name goes when the
  source directory is synced, the new one comes when the target is (a file system
  whose renames are not atomic across a crash, or POSIX read to the letter).

A *cut* (`cut`, or `cut N`: before the N-th state-changing operation from now) is
the power going off: from then on every operation fails with EIO, and the durable
view is what is left. `image DIR` writes it out as a real directory tree (a file
under two names becomes two hard links), which the relay can be started on as it
is, or mounted again (`--image DIR`) to go on under load.

What Linux promises, and how this is stricter. fsync(2)/fdatasync(2) make a file's
data and the metadata needed to read it back durable, but not its name: "an
explicit fsync() on a file descriptor for the directory is also needed" (fsync(2));
the same goes for a directory made by mkdir, durable only once its parent is
synced. ext4 (data=ordered), xfs and btrfs journal each rename as one transaction
(so it is atomic across a crash, as here unless `split_renames`), but they also
commit in order: a fsync there makes every earlier create, mkdir, unlink and rename
durable too, and ext4 flushes the data of a file renamed over another
(auto_da_alloc). None of that holds here: a fsync makes durable only what this
docstring says, directories are synced one by one, and the order in which changes
were made says nothing about which survive (a later rename can be durable while an
earlier mkdir is not). By default nothing unsynced survives, the outcome that loses
most; `image DIR KEEP SEED` instead keeps each unsynced change of names with
probability KEEP, and for a file whose bytes changed since its sync, takes its old
or new length and each 4 KiB page from the old or the new bytes (the torn writes a
disk's write-back can leave).

A file whose rename was split can survive under both names: `image` writes it as
two hard links, as a file system without atomic renames (ext2, vfat) can leave it.

Not modelled: permissions, owners and times (durable at once, never what a test
looks at); symbolic and hard links (link(2), symlink(2) get ENOSYS); xattrs; I/O
errors before the cut; a disk that ignores cache flushes.

The FUSE side is tests/spool/powerfs_fuse.py, a process of its own; `PowerMount` mounts
it and drives it from a test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PAGE = 4096


@dataclass
class Change:
    """A change of names not yet durable: `node` leaves `src` (if any) under `src_name`
    and arrives in `dst` (if any) under `dst_name`; a rename does both at once."""

    node: Node
    src: Node | None = None
    src_name: str = ""
    dst: Node | None = None
    dst_name: str = ""

    def touches(self, directory: Node) -> bool:
        return directory is self.src or directory is self.dst

    def apply(self, durable: Callable[[Node], dict[str, Node]]) -> None:
        if self.src is not None and durable(self.src).get(self.src_name) is self.node:
            del durable(self.src)[self.src_name]
        if self.dst is not None:
            durable(self.dst)[self.dst_name] = self.node


class Node:
    """A file or a directory: its volatile and its durable content."""

    __slots__ = ("data", "ino", "kids", "mode", "mtime", "synced", "synced_kids")
    _inos = itertools.count(2)

    def __init__(self, mode: int, data: bytes = b"") -> None:
        self.ino = next(Node._inos)
        self.mode = mode
        self.data = bytearray(data)
        self.synced = bytes(data)
        self.kids: dict[str, Node] = {}
        self.synced_kids: dict[str, Node] = {}
        self.mtime = time.time_ns()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _survivor(node: Node, keep: float, rng: random.Random) -> bytes:
    """The bytes of a file after a cut: the synced ones, or (with `keep`) a torn mix."""
    if node.synced == node.data or rng.random() >= keep:
        return node.synced
    old, new = node.synced, bytes(node.data)
    size = rng.choice((len(old), len(new)))
    pages = []
    for at in range(0, size, PAGE):
        pick = new if rng.random() < 0.5 else old
        pages.append(pick[at:at + PAGE].ljust(min(PAGE, size - at), b"\0"))
    return b"".join(pages)


def write_image(root: Node, pending: list[Change], target: Path, keep: float = 0.0,
                rng: random.Random | None = None) -> None:
    """Write the durable view under `root` into `target`; with `keep`, each change of
    `pending` (not synced) is kept with that probability, and files are torn (the
    module's docstring)."""
    rng = rng or random.Random(0)
    names: dict[int, dict[str, Node]] = {}

    def durable(directory: Node) -> dict[str, Node]:
        return names.setdefault(directory.ino, dict(directory.synced_kids))

    for change in pending:
        if rng.random() < keep:
            change.apply(durable)
    made: dict[int, Path] = {}

    def walk(node: Node, path: Path) -> None:
        for name, kid in sorted(durable(node).items()):
            where = path / name
            if kid.ino in made:
                if kid.is_dir:
                    continue  # a directory under two names: the first is kept
                os.link(made[kid.ino], where)
                continue
            made[kid.ino] = where
            if kid.is_dir:
                where.mkdir(mode=stat.S_IMODE(kid.mode))
                walk(kid, where)
            else:
                fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(kid.mode))
                with os.fdopen(fd, "wb") as out:
                    out.write(_survivor(kid, keep, rng))

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    walk(root, target)


def read_image(source: Path) -> Node:
    """A tree whose volatile and durable views are both the real directory `source`."""
    seen: dict[tuple[int, int], Node] = {}

    def load(path: Path) -> Node:
        info = os.lstat(path)
        key = (info.st_dev, info.st_ino)
        if key in seen:
            return seen[key]
        if stat.S_ISDIR(info.st_mode):
            node = Node(info.st_mode)
            for entry in sorted(os.listdir(path)):
                node.kids[entry] = load(path / entry)
            node.synced_kids = dict(node.kids)
        else:
            node = Node(info.st_mode, path.read_bytes())
        seen[key] = node
        return node

    return load(source)


class PowerMount:
    """A PowerFS mounted at `mountpoint` in a process of its own, and its controls."""

    def __init__(self, mountpoint: Path, image: Path | None = None,
                 split_renames: bool = False) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tests.spool.powerfs_fuse", str(mountpoint)]
        if image is not None:
            command += ["--image", str(image)]
        if split_renames:
            command.append("--split-renames")
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2])
        ready = self._reply()
        if ready != "ready":
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"powerfs did not mount at {mountpoint}: {ready!r} (does "
                                 "/dev/fuse exist, and is fuse3 (fusermount3) installed?)")

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _ask(self, command: str) -> str:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()
        return self._reply()

    def ops(self) -> int:
        """How many state-changing operations it has done."""
        return int(self._ask("ops"))

    def cut(self, after: int = 0) -> None:
        """Cut the power now, or before the `after`-th state-changing operation from now."""
        self._ask(f"cut {after}")

    def is_cut(self) -> bool:
        """Whether the power is off."""
        return self._ask("cut?") == "yes"

    def save(self, target: Path, keep: float = 0.0, seed: int = 0) -> None:
        """Cut the power (if not done yet) and write what survived into `target`."""
        reply = self._ask(f"image {target} {keep} {seed}")
        assert reply == "ok", reply

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False,
                       capture_output=True)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def mounted(where: Path, split_renames: bool = False) -> Iterator[PowerMount]:
    """A fresh PowerFS mounted at `where` for the block, unmounted after it."""
    mount = PowerMount(where, split_renames=split_renames)
    try:
        yield mount
    finally:
        mount.unmount()
