"""docs/operations.md's advice for quarantined mail holds (issue 20, item 8).

"ID: moved to quarantine: ... -> `queue show` / `delete`": with the daemon running and
without it, `queue show` shows the entry, `status` counts it, `queue delete` removes
it, and `queue retry`, which cannot send a damaged entry, says so and what to do.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.admin.test_status_why import cli, start, wait_for_log

QUEUE_ID = "661F28B623323369AAF25"


def damaged_entry(tmp_path: Path) -> None:
    entry = tmp_path / "state" / "spool" / "queue" / QUEUE_ID
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"not a spool entry\n")


def test_queue_retry_of_a_quarantined_message_says_it_is_quarantined_and_what_to_do(
        tmp_path: Path) -> None:
    damaged_entry(tmp_path)
    daemon, _ = start(tmp_path)
    try:
        wait_for_log(daemon, f"{QUEUE_ID}: moved to quarantine")
        retried = cli(daemon.config, "queue", "retry", QUEUE_ID)
        assert retried.returncode == 1
        said = retried.stderr
        assert f"{QUEUE_ID} is in quarantine, damaged on disk" in said
        assert "not a spool entry" in said
        assert f"`sysmail-relay queue show {QUEUE_ID}`" in said
        assert f"`sysmail-relay queue delete {QUEUE_ID}`" in said
    finally:
        assert daemon.stop() == 0
    stopped = cli(daemon.config, "queue", "retry", QUEUE_ID)
    assert stopped.returncode == 1 and f"{QUEUE_ID} is in quarantine" in stopped.stderr


def test_quarantined_message_is_shown_counted_and_deleted_while_the_daemon_is_stopped(
        tmp_path: Path) -> None:
    damaged_entry(tmp_path)
    daemon, _ = start(tmp_path)
    wait_for_log(daemon, f"{QUEUE_ID}: moved to quarantine")
    assert daemon.stop() == 0
    shown = cli(daemon.config, "queue", "show", QUEUE_ID)
    assert shown.returncode == 0, shown.stderr
    assert f"Message {QUEUE_ID}: quarantined" in shown.stdout
    assert str(tmp_path / "state" / "spool" / "quarantine" / QUEUE_ID) in shown.stdout
    status = cli(daemon.config, "status")
    assert status.returncode == 0, status.stderr
    assert "1 in quarantine" in status.stdout
    deleted = cli(daemon.config, "queue", "delete", QUEUE_ID)
    assert deleted.returncode == 0, deleted.stderr
    assert "the daemon is not running" in deleted.stdout
    assert not (tmp_path / "state" / "spool" / "quarantine" / QUEUE_ID).exists()
    assert "in quarantine" not in cli(daemon.config, "status").stdout
    daemon.start()  # and it starts with nothing left of it
    try:
        assert cli(daemon.config, "queue", "list").stdout.strip() == "the queue is empty"
    finally:
        daemon.stop(signal.SIGKILL)
