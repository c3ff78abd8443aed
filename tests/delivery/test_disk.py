"""Claims made durable beside the deliveries: one fsync of active/ for all the claims
handed over while the last one ran, and a failed fsync said in the log."""

from __future__ import annotations

import errno
import logging
import threading

import pytest

from relay.delivery.disk import ClaimSync


class Place:
    """A stand-in for `Spool.sync`: counts its calls; the first may be held."""

    def __init__(self, fails: bool = False) -> None:
        self.calls = 0
        self.fails = fails
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def sync(self) -> None:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        if self.fails:
            raise OSError(errno.EIO, "Input/output error")


def test_claims_handed_over_during_a_sync_share_the_next_one() -> None:
    active = Place()
    active.release.clear()
    work = ClaimSync()
    work.submit(active.sync)  # the first claim: its sync runs and is held
    assert active.started.wait(10)
    for _ in range(5):  # five more claims while it runs
        work.submit(active.sync)
    active.release.set()
    assert work.wait()
    assert active.calls == 2


def test_a_failed_sync_is_logged_naming_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    active = Place(fails=True)
    work = ClaimSync()
    with caplog.at_level(logging.ERROR, logger="relay.delivery"):
        work.submit(active.sync)
        assert work.wait()
    assert active.calls == 1
    assert "cannot make claimed messages durable" in caplog.text
    assert "Input/output error" in caplog.text
