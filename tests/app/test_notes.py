"""What the daemon says about itself: a reload that needs a restart names each setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.app.notes import restart_needed, status_line
from relay.settings import Settings, load_settings


def settings(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path / "s"}"\n{text}')
    return load_settings(config)


BASE = '[listener]\nport = 2525\nworkers = 1\n[admin]\nport = 8525\n'


def test_a_reload_that_changes_nothing_a_restart_applies_says_nothing(tmp_path: Path) -> None:
    old = settings(tmp_path, BASE)
    new = settings(tmp_path, BASE + '[queue]\nmax_age = "2d"\n')
    assert restart_needed(old, new, workers=1) == []


def test_each_setting_only_a_restart_applies_is_named_with_its_new_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_ADMIN__PORT")  # the tests' admin listener: the file's here
    old = settings(tmp_path, BASE)
    new = settings(tmp_path, 'event_loop = "uvloop"\n[listener]\nport = 2526\nworkers = 2\n'
                             '[admin]\nport = 8526\n[fleet]\nurl = "redis://127.0.0.1:6379"\n')
    found = restart_needed(old, new, workers=1)
    assert found == [
        "listener.workers changed: restart the relay to run 2 intake processes",
        "listener.host/port changed: restart the relay to listen on 127.0.0.1:2526",
        "admin.host/port changed: restart the relay to serve the admin listener on "
        "127.0.0.1:8526",
        "[fleet] changed: restart the relay to join or leave the fleet with the new settings",
        "event_loop changed: restart the relay to run on uvloop"]


def test_the_status_line_counts_the_queue_and_says_when_the_account_is_inactive() -> None:
    counts = {"queued": 3, "deferred": 2, "held": 1, "active": 4, "dead": 0}
    assert status_line(counts, True) == "3 queued, 2 deferred, 1 held, 4 sending, 0 dead"
    assert status_line(counts, False).startswith("account inactive, 3 queued")
