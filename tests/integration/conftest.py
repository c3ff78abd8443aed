"""Fixtures for the tests against real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .operator import Relay


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        relay.stop()
