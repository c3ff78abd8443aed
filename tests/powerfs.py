"""PowerFS: a FUSE file system that forgets, at a power cut, all that was not synced.

It keeps the whole tree in memory, twice:

- the *volatile* view, what processes see: every write, truncate, create, mkdir,
  rename and unlink takes effect at once, as in the page cache;
- the *durable* view, what a disk would hold: a file's bytes (and so its length)
  become durable only when that file is fsync'ed or fdatasync'ed; a change of names
  (a file or directory made, removed, or renamed) only when a directory it changes
  is fsync'ed. A rename is one change: the old name goes and the new one comes
  together, when the source or the target directory is synced.

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
(so it is atomic across a crash, as here), but they also commit in order: a fsync
there makes every earlier create, mkdir, unlink and rename durable too, and ext4
flushes the data of a file renamed over another (auto_da_alloc). None of that holds
here: a fsync makes durable only what this docstring says, directories are synced
one by one, and the order in which changes were made says nothing about which
survive (a later rename can be durable while an earlier mkdir is not). By default
nothing unsynced survives, the outcome that loses most; `image DIR KEEP SEED`
instead keeps each unsynced change of names with probability KEEP, and for a file
whose bytes changed since its sync, takes its old or new length and each 4 KiB page
from the old or the new bytes (the torn writes a disk's write-back can leave).

Not modelled: a file system without atomic renames (ext2, vfat), where a rename can
be durable in one directory and not the other; permissions, owners and times (durable
at once, never what a test looks at); symbolic and hard links (link(2), symlink(2)
get ENOSYS); xattrs; I/O errors before the cut; a disk that ignores cache flushes.

Run as `python -m tests.powerfs MOUNTPOINT [--image DIR]`; it prints `ready` once
mounted and takes commands on stdin (`ops`, `cut [N]`, `wait-cut`, `image DIR [KEEP
SEED]`), one reply line each. `PowerMount` drives it from a test.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _serve(mountpoint: str, root: Node) -> None:
    import mfusepy  # the FUSE binding is needed only in the file system's own process

    class PowerFS(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self._mutex = threading.Lock()
            self.root = root
            self.handles: dict[int, Node] = {}
            self.pending: list[Change] = []
            self.fhs = itertools.count(1)
            self.ops = 0
            self.cut_at: int | None = None
            self.cut_done = threading.Event()

        # --- the power ------------------------------------------------------------

        def _live(self, changes: bool) -> None:
            """Called under the lock by every operation; EIO once the power is off."""
            if changes:
                if self.cut_at is not None and self.ops >= self.cut_at:
                    self.cut_done.set()
                if not self.cut_done.is_set():
                    self.ops += 1
            if self.cut_done.is_set():
                raise _fail(errno.EIO)

        def cut(self, after: int) -> None:
            with self._mutex:
                self.cut_at = self.ops + after
                if after <= 0:
                    self.cut_done.set()

        # --- names ---------------------------------------------------------------

        def _node(self, path: str, fh: int | None = None) -> Node:
            if fh:
                return self.handles[fh]
            node = self.root
            for part in path.strip("/").split("/") if path != "/" else []:
                if not node.is_dir:
                    raise _fail(errno.ENOTDIR)
                if part not in node.kids:
                    raise _fail(errno.ENOENT)
                node = node.kids[part]
            return node

        def _parent(self, path: str) -> tuple[Node, str]:
            head, _, name = path.rstrip("/").rpartition("/")
            parent = self._node(head or "/")
            if not parent.is_dir:
                raise _fail(errno.ENOTDIR)
            return parent, name

        def _handle(self, node: Node) -> int:
            fh = next(self.fhs)
            self.handles[fh] = node
            return fh

        # --- operations ------------------------------------------------------------

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self._mutex:
                self._live(False)
                node = self._node(path, fh)
                return {"st_mode": node.mode, "st_ino": node.ino, "st_size": len(node.data),
                        "st_nlink": 2 if node.is_dir else 1, "st_uid": os.getuid(),
                        "st_gid": os.getgid(), "st_mtime": node.mtime,
                        "st_ctime": node.mtime, "st_atime": node.mtime,
                        "st_blocks": (len(node.data) + 511) // 512, "st_blksize": PAGE}

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            with self._mutex:
                self._live(False)
                node = self._node(path, fh)
                return [(name, {"st_mode": kid.mode, "st_ino": kid.ino}, 0)
                        for name, kid in [(".", node), ("..", node), *node.kids.items()]]

        def opendir(self, path: str) -> int:
            with self._mutex:
                self._live(False)
                return self._handle(self._node(path))

        def open(self, path: str, flags: int) -> int:
            with self._mutex:
                self._live(bool(flags & os.O_TRUNC))
                node = self._node(path)
                if flags & os.O_TRUNC:
                    del node.data[:]
                return self._handle(node)

        def create(self, path: str, mode: int, flags: int) -> int:
            with self._mutex:
                self._live(True)
                parent, name = self._parent(path)
                if name in parent.kids:
                    if flags & os.O_EXCL:
                        raise _fail(errno.EEXIST)
                    return self._handle(parent.kids[name])
                node = parent.kids[name] = Node(stat.S_IFREG | (mode & 0o7777))
                self.pending.append(Change(node, dst=parent, dst_name=name))
                return self._handle(node)

        def mkdir(self, path: str, mode: int) -> int:
            with self._mutex:
                self._live(True)
                parent, name = self._parent(path)
                if name in parent.kids:
                    raise _fail(errno.EEXIST)
                node = parent.kids[name] = Node(stat.S_IFDIR | (mode & 0o7777))
                self.pending.append(Change(node, dst=parent, dst_name=name))
                return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self._mutex:
                self._live(False)
                return bytes(self._node(path, fh).data[offset:offset + size])

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self._mutex:
                self._live(True)
                node = self._node(path, fh)
                if offset > len(node.data):
                    node.data.extend(bytes(offset - len(node.data)))
                node.data[offset:offset + len(data)] = data
                node.mtime = time.time_ns()
                return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self._mutex:
                self._live(True)
                node = self._node(path, fh)
                del node.data[length:]
                node.data.extend(bytes(length - len(node.data)))
                return 0

        def unlink(self, path: str) -> int:
            with self._mutex:
                self._live(True)
                parent, name = self._parent(path)
                node = self._node(path)
                if node.is_dir:
                    raise _fail(errno.EISDIR)
                del parent.kids[name]
                self.pending.append(Change(node, src=parent, src_name=name))
                return 0

        def rmdir(self, path: str) -> int:
            with self._mutex:
                self._live(True)
                parent, name = self._parent(path)
                node = self._node(path)
                if not node.is_dir:
                    raise _fail(errno.ENOTDIR)
                if node.kids:
                    raise _fail(errno.ENOTEMPTY)
                del parent.kids[name]
                self.pending.append(Change(node, src=parent, src_name=name))
                return 0

        def rename(self, old: str, new: str) -> int:
            with self._mutex:
                self._live(True)
                src, old_name = self._parent(old)
                dst, new_name = self._parent(new)
                node = self._node(old)
                there = dst.kids.get(new_name)
                if there is node:
                    return 0  # two names of one file: rename(2) does nothing
                if there is not None:
                    if there.is_dir and not node.is_dir:
                        raise _fail(errno.EISDIR)
                    if node.is_dir and not there.is_dir:
                        raise _fail(errno.ENOTDIR)
                    if there.kids:
                        raise _fail(errno.ENOTEMPTY)
                del src.kids[old_name]
                dst.kids[new_name] = node
                self.pending.append(Change(node, src, old_name, dst, new_name))
                return 0

        def chmod(self, path: str, mode: int) -> int:
            with self._mutex:
                self._live(True)
                node = self._node(path)
                node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
                return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            with self._mutex:
                self._live(True)
                return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            with self._mutex:
                self._live(True)
                self._node(path).mtime = times[1] if times else time.time_ns()
                return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            with self._mutex:
                self._live(True)
                node = self._node(path, fh)
                node.synced = bytes(node.data)
                return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            with self._mutex:
                self._live(True)
                node = self._node(path, fh)
                synced = [change for change in self.pending if change.touches(node)]
                self.pending = [change for change in self.pending if not change.touches(node)]
                for change in synced:  # in the order they were made
                    change.apply(lambda directory: directory.synced_kids)
                return 0

        def release(self, path: str, fh: int) -> int:
            with self._mutex:
                self.handles.pop(fh, None)
                return 0

        def releasedir(self, path: str, fh: int) -> int:
            return self.release(path, fh)

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": PAGE, "f_frsize": PAGE, "f_blocks": 1 << 22,
                    "f_bfree": 1 << 21, "f_bavail": 1 << 21, "f_files": 1 << 20,
                    "f_ffree": 1 << 19, "f_favail": 1 << 19, "f_namemax": 255}

        def init(self, path: str) -> None:
            threading.Thread(target=self._control, name="control", daemon=True).start()

        # --- the test's side -----------------------------------------------------

        def _control(self) -> None:
            print("ready", flush=True)
            for line in sys.stdin:
                words = line.split()
                if not words:
                    continue
                if words[0] == "ops":
                    with self._mutex:
                        reply = str(self.ops)
                elif words[0] == "cut":
                    self.cut(int(words[1]) if len(words) > 1 else 0)
                    reply = "ok"
                elif words[0] == "wait-cut":
                    self.cut_done.wait()
                    reply = str(self.ops)
                elif words[0] == "image":
                    keep = float(words[2]) if len(words) > 2 else 0.0
                    rng = random.Random(int(words[3]) if len(words) > 3 else 0)
                    with self._mutex:
                        self.cut_done.set()  # an image is taken with the power off
                        write_image(self.root, self.pending, Path(words[1]), keep, rng)
                    reply = "ok"
                else:
                    reply = f"error: unknown command {words[0]}"
                print(reply, flush=True)

    mfusepy.FUSE(PowerFS(), mountpoint, foreground=True, nothreads=False, hard_remove=True,
                 use_ino=True, fsname="powerfs", max_threads=16)


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

    def __init__(self, mountpoint: Path, image: Path | None = None) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tests.powerfs", str(mountpoint)]
        if image is not None:
            command += ["--image", str(image)]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent)
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

    def wait_cut(self) -> int:
        """Wait for the cut; the operations done before it."""
        return int(self._ask("wait-cut"))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--image", type=Path, help="start from this directory's tree")
    args = parser.parse_args()
    root = read_image(args.image) if args.image else Node(stat.S_IFDIR | 0o755)
    root.mode = stat.S_IFDIR | 0o755
    _serve(args.mountpoint, root)


if __name__ == "__main__":
    main()
