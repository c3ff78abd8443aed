"""`check`, the start-up log, `status` and the page warn when state_dir's file system
does not keep the spool's promise across a power cut: ext2/3/4 without a journal, or a
file system in memory. /proc and /sys are given as trees here, with the device numbers
of the test's own directory, so each case runs on any machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.settings import load_settings, warnings
from relay.settings.disk import durability_warning


def fake_system(tmp_path: Path, fstype: str,
                journals: list[str]) -> tuple[Path, Path, Path]:
    """A state_dir, and /proc and /sys trees that put it on device `vdb` of `fstype`,
    mounted at the state_dir's parent (and bound elsewhere too)."""
    point = tmp_path / "mount point"  # a space, which mountinfo writes as \040
    state = point / "state"
    state.mkdir(parents=True)
    dev = os.stat(state).st_dev
    numbers = f"{os.major(dev)}:{os.minor(dev)}"
    proc, sys_dir = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    written = str(point.resolve()).replace(" ", "\\040")
    (proc / "self" / "mountinfo").write_text(
        f"22 1 {numbers} / / rw,relatime shared:1 - {fstype} /dev/vdb rw\n"
        f"23 22 {numbers} /srv {written} rw - {fstype} /dev/vdb rw\n"
        f"24 22 {numbers} /srv /run/elsewhere rw - {fstype} /dev/vdb rw\n"
        "25 1 0:5 / /proc rw - proc proc rw\n")
    (proc / "fs" / "jbd2").mkdir(parents=True)
    for journal in journals:
        (proc / "fs" / "jbd2" / journal).mkdir()
    (sys_dir / "dev" / "block").mkdir(parents=True)
    (sys_dir / "dev" / "block" / numbers).symlink_to("../../devices/virtual/block/vdb")
    return state, proc, sys_dir


def test_ext4_without_a_journal_is_named_with_the_device_and_the_fix(tmp_path: Path) -> None:
    state, proc, sys_dir = fake_system(tmp_path, "ext4", journals=["vda-8"])
    warning = durability_warning(state, proc, sys_dir)
    assert warning == (
        f"state_dir {state} is on ext4 (/dev/vdb at {state.parent.resolve()}) without a "
        "journal: a power cut "
        "while a message is being delivered can lose it (docs/reliability.md); put "
        "state_dir on a file system that journals its metadata (ext4 with its journal, "
        "xfs, btrfs)")


def test_ext4_with_its_journal_and_other_file_systems_say_nothing(tmp_path: Path) -> None:
    state, proc, sys_dir = fake_system(tmp_path / "a", "ext4", journals=["vdb-8"])
    assert durability_warning(state, proc, sys_dir) is None
    for fstype in ("xfs", "btrfs", "overlay", "zfs"):
        state, proc, sys_dir = fake_system(tmp_path / fstype, fstype, journals=[])
        assert durability_warning(state, proc, sys_dir) is None, fstype


def test_a_file_system_in_memory_is_named(tmp_path: Path) -> None:
    state, proc, sys_dir = fake_system(tmp_path, "tmpfs", journals=[])
    warning = durability_warning(state / "not yet made", proc, sys_dir)
    assert warning is not None
    assert f"is on tmpfs (/dev/vdb at {state.parent.resolve()}), in memory" in warning
    assert "put state_dir on a disk" in warning


def test_without_proc_or_sys_nothing_is_said(tmp_path: Path) -> None:
    state, _, _ = fake_system(tmp_path, "ext4", journals=[])
    assert durability_warning(state, tmp_path / "none", tmp_path / "none") is None


def test_the_warning_is_among_the_configurations_warnings(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state, proc, sys_dir = fake_system(tmp_path, "ext3", journals=[])
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{state}"\n')
    monkeypatch.setattr("relay.settings.load.durability_warning",
                        lambda place: durability_warning(place, proc, sys_dir))
    assert any(w.startswith(f"state_dir {state} is on ext3") for w in
               warnings(load_settings(config)))
