"""A container engine for the tests, and base images made locally (no registry here).

`find_engine()` returns podman (or docker with a running daemon) or skips the test,
saying why no engine can run. `base_image(engine, variant)` returns a Debian 12
image made with debootstrap, once: it is kept in the engine's store, and as a
tarball under /var/tmp/sysmail-relay-test/ from which it is re-imported in seconds
when the store was emptied. Variants: "python" (python3, its venv module and CA
certificates: what python:*-slim offers) and "systemd" (the same plus systemd as
init, for running the units for real). RELAY_TEST_CONTAINER_BASE names another
image for the "python" variant (e.g. python:3.12-slim where a registry is reachable).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import BinaryIO

import pytest

ROOT = Path(__file__).parent.parent
CACHE = Path("/var/tmp/sysmail-relay-test")
VARIANTS = {
    "python": ("localhost/sysmail-relay-test-base:bookworm",
               "python3,python3-venv,ca-certificates"),
    "systemd": ("localhost/sysmail-relay-test-systemd:bookworm",
                "systemd,systemd-sysv,dbus,procps,python3,python3-venv,ca-certificates"),
}


def run(*args: str, timeout: float = 120, check: bool = True,
        stdin: BinaryIO | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, stdin=stdin, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def find_engine(podman_only: bool = False) -> str:
    """The first container engine that can run here, else skip saying why none can."""
    why = []
    for name in ("podman",) if podman_only else ("podman", "docker"):
        path = shutil.which(name)
        if path is None:
            why.append(f"{name}: not installed")
            continue
        try:
            info = run(path, "info", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            why.append(f"{name}: `{name} info` did not answer within 60 s")
            continue
        if info.returncode == 0:
            return path
        lines = (info.stderr or info.stdout).strip().splitlines()
        why.append(f"{name}: `{name} info` failed: {lines[-1] if lines else info.returncode}")
    pytest.skip("no container engine can run here (" + "; ".join(why) + "); as root, "
                ".ci/install-container.sh installs podman configured for this kind of machine")


def image_exists(engine: str, image: str) -> bool:
    return run(engine, "image", "inspect", image, check=False).returncode == 0


def base_image(engine: str, variant: str = "python") -> str:
    """The base image of this variant: made with debootstrap once, then kept."""
    if variant == "python" and (named := os.environ.get("RELAY_TEST_CONTAINER_BASE")):
        return named
    image, packages = VARIANTS[variant]
    if image_exists(engine, image):
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"debian12-{variant}-rootfs.tar"
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one debootstrap at a time
        if not tarball.exists():
            make_rootfs_tarball(tarball, packages)
        if not image_exists(engine, image):
            change = ["--change", 'CMD ["/sbin/init"]'] if variant == "systemd" else []
            with tarball.open("rb") as data:
                run(engine, "import", *change, "-", image, stdin=data, timeout=300)
    return image


def make_rootfs_tarball(tarball: Path, packages: str) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if os.geteuid() != 0 or not Path(debootstrap).exists():
        pytest.fail("the container engine runs but there is no base image: as root, install "
                    "debootstrap (.ci/install-container.sh) so that the test can make one, or set "
                    "RELAY_TEST_CONTAINER_BASE to an image such as python:3.12-slim")
    rootfs = tarball.with_suffix(".d")
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = os.environ.get("RELAY_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    run(debootstrap, "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs),
        mirror, timeout=900)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                 "usr/share/man", "usr/share/locale", "usr/share/info"):
        for child in (rootfs / junk).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            elif child.name != "lock":
                child.unlink()
    partial = tarball.with_suffix(".tmp")
    run("tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), ".", timeout=300)
    partial.rename(tarball)
    shutil.rmtree(rootfs, ignore_errors=True)
