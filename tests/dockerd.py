"""A private Docker engine for the tests: Debian's dockerd, started here and stopped after.

`private_dockerd(workdir)` starts `/usr/sbin/dockerd` (Debian's docker.io, installed
by .ci/install-container.sh) with everything of its own under `workdir`: data root
(images, containers, volumes, and the containerd it supervises), exec root, pid file,
a unix socket, and an empty daemon.json, so /etc/docker, /var/lib/docker and a
system dockerd (if any) are neither read nor touched. No network setup is asked for
(`--bridge=none --iptables=false`): the tests use `--network none` and
`--network container:NAME`, which need no bridge and no firewall rules. Storage is
overlay2, else vfs (slower, works on any file system).

It yields a `Dockerd` whose `cli` is an executable wrapper around Debian's docker CLI
(20.10, the daemon's own version) bound to that socket, with its own DOCKER_CONFIG
(no user configuration or credentials are read): a drop-in for the `engine` of
tests/containers.py and for deploy/container/build-image.sh --engine. On exit the
daemon gets SIGTERM (it stops its containers and its containerd; SIGKILL if it has
not gone within 60 s), leftover mounts under `workdir` are
unmounted, and `workdir` is removed. Where no dockerd can start here the test is
skipped with each attempt's error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STORAGE_DRIVERS = ("overlay2", "vfs")
CGROUP_PARENT = "sysmail-relay-test-docker"  # cgroupfs: /sys/fs/cgroup/*/this/<container>
START_WITHIN = 60.0


@dataclass(frozen=True)
class Dockerd:
    cli: str            # the wrapper: `cli run ...` talks to this daemon only
    socket: Path
    data_root: Path
    storage_driver: str
    version: str


def docker_programs() -> tuple[str, str] | str:
    """(dockerd, docker) of Debian's docker.io, or why they cannot be used."""
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        return ("dockerd is not installed; as root, .ci/install-container.sh installs "
                "Debian's docker.io")
    # The CLI of the same package (/usr/bin/docker for /usr/sbin/dockerd): another docker
    # earlier on PATH may be a newer client whose `build` wants a buildx plugin.
    sibling = Path(dockerd).parent.parent / "bin" / "docker"
    docker = str(sibling) if sibling.exists() else shutil.which("docker")
    if docker is None:
        return "dockerd is installed but no docker CLI is"
    return dockerd, docker


@contextlib.contextmanager
def private_dockerd(workdir: Path) -> Iterator[Dockerd]:
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root here (no rootless setup): run the tests as root")
    programs = docker_programs()
    if isinstance(programs, str):
        pytest.skip(programs)
    dockerd, docker = programs
    workdir.mkdir(parents=True, exist_ok=True)
    why: list[str] = []
    try:
        for driver in STORAGE_DRIVERS:
            started = _start(dockerd, docker, workdir / driver, driver)
            if isinstance(started, str):
                why.append(f"{driver}: {started}")
                continue
            process, daemon = started
            try:
                yield daemon
            finally:
                _stop(process, workdir / driver)
            return
        pytest.skip("dockerd cannot start here: " + "; ".join(why))
    finally:
        _unmount_below(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        _remove_cgroup_parent()


def _start(dockerd: str, docker: str, root: Path,
           driver: str) -> tuple[subprocess.Popen[bytes], Dockerd] | str:
    root.mkdir(parents=True)
    (root / "daemon.json").write_text("{}\n")
    (root / "client").mkdir()
    sock = root / "docker.sock"
    cli = root / "docker"
    cli.write_text(f"#!/bin/sh\nDOCKER_CONFIG={root / 'client'} exec {docker} "
                   f"--host unix://{sock} \"$@\"\n")
    cli.chmod(0o755)
    log = root / "dockerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [dockerd, "--config-file", str(root / "daemon.json"),
             "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "dockerd.pid"), "--host", f"unix://{sock}",
             "--storage-driver", driver, "--bridge", "none", "--iptables=false",
             "--ip6tables=false", "--ip-masq=false", "--cgroup-parent", CGROUP_PARENT],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # not in the terminal's process group (Ctrl-C)
    deadline = time.monotonic() + START_WITHIN
    while True:
        if process.poll() is not None:
            return f"dockerd exited with {process.returncode}: {_last_error(log)}"
        if sock.exists():
            info = subprocess.run([str(cli), "info", "--format",
                                   "{{.ServerVersion}} {{.Driver}}"],
                                  capture_output=True, text=True, timeout=30)
            if info.returncode == 0:
                version, found = info.stdout.split()
                if found != driver:
                    _stop(process, root)
                    return f"dockerd chose storage {found} instead"
                return process, Dockerd(str(cli), sock, root / "data", driver, version)
        if time.monotonic() > deadline:
            _stop(process, root)
            return f"no answer on {sock} within {START_WITHIN:.0f} s: {_last_error(log)}"
        time.sleep(0.2)


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if "level=error" in line or "level=fatal" in line or "failed" in line]
    return lines[-1] if lines else "(nothing in its log)"


def _stop(process: subprocess.Popen[bytes], root: Path) -> None:
    """SIGTERM: dockerd stops its containers, then its containerd, then itself."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()  # its containerd has SIGKILL as parent-death signal
            process.wait(timeout=30)
    _unmount_below(root)


def _unmount_below(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)


def _remove_cgroup_parent() -> None:
    """The empty cgroups dockerd made for its containers' parent (cgroup v1 and v2)."""
    own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    root = Path("/sys/fs/cgroup")
    for _, controllers, path in own:
        # v1: one hierarchy per controller; v2 ("0::/..."): unified, or the root itself
        bases = [root / c.removeprefix("name=") for c in controllers.split(",")] \
            if controllers else [root / "unified", root]
        for base in bases:
            for parent in (base / CGROUP_PARENT, base / path.lstrip("/") / CGROUP_PARENT):
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when empty: another test run's dockerd may use it
