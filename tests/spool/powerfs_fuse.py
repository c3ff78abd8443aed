"""The PowerFS process: tests/spool/powerfs.py's model served over FUSE by mfusepy.

`python -m tests.spool.powerfs_fuse MOUNTPOINT [--image DIR] [--split-renames]` mounts
it (empty, or holding the tree of DIR; `--split-renames`: the two halves of a rename
become durable separately, tests/spool/powerfs.py), prints `ready`, and takes one
command a line on stdin, answering each with one line: `ops` (how many
state-changing operations so far), `cut [N]` (the power goes off now, or before the
N-th such operation from now), `cut?` (`yes` once it is off), `image DIR [KEEP SEED]`
(the power goes off and what survived is written into DIR).
`tests.spool.powerfs.PowerMount` speaks this for a test.
"""

from __future__ import annotations

import argparse
import errno
import functools
import itertools
import os
import random
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mfusepy

from .powerfs import PAGE, Change, Node, read_image, write_image

F = TypeVar("F", bound=Callable[..., Any])


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _op(changes: bool) -> Callable[[F], F]:
    """An operation: one at a time, EIO once the power is off; `changes`: it changes
    the state (it is counted, and a cut can fall before it)."""
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def run(self: PowerFS, *args: Any, **kwargs: Any) -> Any:
            with self.mutex:
                if changes and not self.cut_done.is_set():
                    if self.cut_at is not None and self.ops >= self.cut_at:
                        self.cut_done.set()
                    else:
                        self.ops += 1
                if self.cut_done.is_set():
                    raise _fail(errno.EIO)
                return method(self, *args, **kwargs)
        return run  # type: ignore[return-value]
    return wrap


class PowerFS(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, root: Node, split_renames: bool = False) -> None:
        self.mutex = threading.Lock()
        self.split_renames = split_renames
        """A rename's leaving and arriving are durable separately (each with its directory)."""
        self.root = root
        self.handles: dict[int, Node] = {}
        self.fhs = itertools.count(1)
        self.pending: list[Change] = []
        """Changes of names not yet durable, in the order they were made."""
        self.ops = 0
        self.cut_at: int | None = None
        self.cut_done = threading.Event()

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

    # --- what processes see ------------------------------------------------------

    @_op(changes=False)
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path, fh)
        return {"st_mode": node.mode, "st_ino": node.ino, "st_size": len(node.data),
                "st_nlink": 2 if node.is_dir else 1, "st_uid": os.getuid(),
                "st_gid": os.getgid(), "st_mtime": node.mtime, "st_ctime": node.mtime,
                "st_atime": node.mtime, "st_blocks": (len(node.data) + 511) // 512,
                "st_blksize": PAGE}

    @_op(changes=False)
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        node = self._node(path, fh)
        return [(name, {"st_mode": kid.mode, "st_ino": kid.ino}, 0)
                for name, kid in [(".", node), ("..", node), *node.kids.items()]]

    @_op(changes=False)
    def opendir(self, path: str) -> int:
        return self._handle(self._node(path))

    @_op(changes=False)
    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if flags & os.O_TRUNC:
            del node.data[:]
        return self._handle(node)

    @_op(changes=False)
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return bytes(self._node(path, fh).data[offset:offset + size])

    @_op(changes=True)
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._parent(path)
        if name in parent.kids:
            if flags & os.O_EXCL:
                raise _fail(errno.EEXIST)
            return self._handle(parent.kids[name])
        node = parent.kids[name] = Node(stat.S_IFREG | (mode & 0o7777))
        self.pending.append(Change(node, dst=parent, dst_name=name))
        return self._handle(node)

    @_op(changes=True)
    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        if name in parent.kids:
            raise _fail(errno.EEXIST)
        node = parent.kids[name] = Node(stat.S_IFDIR | (mode & 0o7777))
        self.pending.append(Change(node, dst=parent, dst_name=name))
        return 0

    @_op(changes=True)
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        node = self._node(path, fh)
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset:offset + len(data)] = data
        node.mtime = time.time_ns()
        return len(data)

    @_op(changes=True)
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        node = self._node(path, fh)
        del node.data[length:]
        node.data.extend(bytes(length - len(node.data)))
        return 0

    @_op(changes=True)
    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._node(path)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        del parent.kids[name]
        self.pending.append(Change(node, src=parent, src_name=name))
        return 0

    @_op(changes=True)
    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._node(path)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.kids:
            raise _fail(errno.ENOTEMPTY)
        del parent.kids[name]
        self.pending.append(Change(node, src=parent, src_name=name))
        return 0

    @_op(changes=True)
    def rename(self, old: str, new: str) -> int:
        src, old_name = self._parent(old)
        dst, new_name = self._parent(new)
        node = self._node(old)
        there = dst.kids.get(new_name)
        if there is node:
            return 0  # two names of one file: rename(2) does nothing
        if there is not None:
            if there.is_dir != node.is_dir:
                raise _fail(errno.EISDIR if there.is_dir else errno.ENOTDIR)
            if there.kids:
                raise _fail(errno.ENOTEMPTY)
        del src.kids[old_name]
        dst.kids[new_name] = node
        if self.split_renames:
            self.pending += [Change(node, src=src, src_name=old_name),
                             Change(node, dst=dst, dst_name=new_name)]
        else:
            self.pending.append(Change(node, src, old_name, dst, new_name))
        return 0

    @_op(changes=True)
    def chmod(self, path: str, mode: int) -> int:
        node = self._node(path)
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        return 0

    @_op(changes=True)
    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    @_op(changes=True)
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._node(path).mtime = times[1] if times else time.time_ns()
        return 0

    # --- what a disk keeps -------------------------------------------------------

    @_op(changes=True)
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        node = self._node(path, fh)
        node.synced = bytes(node.data)
        return 0

    @_op(changes=True)
    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        node = self._node(path, fh)
        synced = [change for change in self.pending if change.touches(node)]
        self.pending = [change for change in self.pending if not change.touches(node)]
        for change in synced:  # in the order they were made
            change.apply(lambda directory: directory.synced_kids)
        return 0

    def release(self, path: str, fh: int) -> int:
        with self.mutex:
            self.handles.pop(fh, None)
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return self.release(path, fh)

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": PAGE, "f_frsize": PAGE, "f_blocks": 1 << 22, "f_bfree": 1 << 21,
                "f_bavail": 1 << 21, "f_files": 1 << 20, "f_ffree": 1 << 19,
                "f_favail": 1 << 19, "f_namemax": 255}

    # --- the test's side ---------------------------------------------------------

    def init(self, path: str) -> None:
        threading.Thread(target=self.control, name="control", daemon=True).start()

    def control(self) -> None:
        print("ready", flush=True)
        for line in sys.stdin:
            command, *args = line.split() or [""]
            with self.mutex:
                if command == "ops":
                    reply = str(self.ops)
                elif command == "cut":
                    self.cut_at = self.ops + (int(args[0]) if args else 0)
                    if self.cut_at <= self.ops:
                        self.cut_done.set()
                    reply = "ok"
                elif command == "cut?":
                    reply = "yes" if self.cut_done.is_set() else "no"
                elif command == "image":
                    self.cut_done.set()  # an image is taken with the power off
                    keep = float(args[1]) if len(args) > 1 else 0.0
                    rng = random.Random(int(args[2]) if len(args) > 2 else 0)
                    write_image(self.root, self.pending, Path(args[0]), keep, rng)
                    reply = "ok"
                else:
                    reply = f"error: unknown command {command!r}"
            print(reply, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--image", type=Path, help="start from this directory's tree")
    parser.add_argument("--split-renames", action="store_true",
                        help="a rename's two halves become durable separately")
    args = parser.parse_args()
    root = read_image(args.image) if args.image else Node(stat.S_IFDIR | 0o755)
    root.mode = stat.S_IFDIR | 0o755
    mfusepy.FUSE(PowerFS(root, args.split_renames), args.mountpoint, foreground=True,
                 nothreads=False, hard_remove=True, use_ino=True, fsname="powerfs", max_threads=16)


if __name__ == "__main__":
    main()
