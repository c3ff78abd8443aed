"""A description of the machine and software a result was measured with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.peers.procutil import which


def describe(work_dir: Path, repo: Path) -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mib": _memory_mib(),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "python": sys.version.split()[0],
        "postfix": _command(["postconf", "-d", "-h", "mail_version"]),
        "packages": {name: _version(name)
                     for name in ("sysmail-relay", "aiosmtpd", "aiosmtplib", "uvloop")},
        "relay_commit": _command(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "relay_uncommitted_changes": _uncommitted(repo),
        "work_dir_filesystem": _filesystem(work_dir),
    }


def summary_line(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu_model']}, {machine['cores']} cores, {machine['memory_mib']} MiB, "
            f"{machine['kernel']}, Python {machine['python']}, Postfix {machine['postfix']}, "
            f"relay {machine['relay_commit']}"
            f"{' + uncommitted changes' if machine['relay_uncommitted_changes'] else ''}, "
            f"spool on {machine['work_dir_filesystem']}")


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_mib() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def _os_release() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "unknown"


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding *path* (fsync cost depends on it)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, f"{parts[2]}{_journal(parts)} ({parts[0]} on {mount})"
    return kind


def _journal(mount: list[str]) -> str:
    """', no journal' for an ext4 without one (fsync is cheaper there)."""
    if mount[2] != "ext4":
        return ""
    task = Path("/sys/fs/ext4") / Path(mount[0]).name / "journal_task"
    return ", no journal" if _read(str(task)).strip() == "<none>" else ""


def _uncommitted(repo: Path) -> bool | None:
    # --no-optional-locks: read only, never refresh the index others are using.
    out = _command(["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain",
                    "--", "relay"])
    return None if out == "unknown" else bool(out)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _command(argv: list[str]) -> str:
    binary = which(argv[0])
    if binary is None:
        return "unknown"
    try:
        proc = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=10,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
