"""Scenario S: how end to end scales with client sessions and upstream connections.

A grid of client sessions (smtp-source -s N) by `[servers.sink] pool_size` (the
relay's connections to the upstream). Each cell is scenario B's measurement of
the relay alone: a fresh smtp-sink, a fresh relay with that pool_size, 1 KiB
messages, one per client connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report
from bench.relay_instance import RelayOptions
from bench.scenarios import RELAY, Measurement, into_sink

KIB = 1024
SESSIONS = (1, 20, 200)
POOL_SIZES = (1, 2, 4)
FIGURES = (("end_to_end_per_s", "end-to-end msg/s"), ("cpu_ms_per_msg", "relay CPU ms/msg"))


def sessions_label(sessions: int) -> str:
    return f"{sessions} client session{'' if sessions == 1 else 's'}"


def variant(sessions: int, pool_size: int) -> str:
    return f"{sessions_label(sessions)}, pool_size {pool_size}"


CELLS = {variant(s, p): (s, p) for s in SESSIONS for p in POOL_SIZES}
"""Every cell of the grid by its name, in the order they run."""


def describe(messages: int) -> str:
    return (f"S  as B for the relay alone, {messages} messages of 1 KiB per cell: "
            f"smtp-source -s {'/'.join(map(str, SESSIONS))} by [servers.sink] "
            f"pool_size {'/'.join(map(str, POOL_SIZES))}")


def cell(workdir: Path, name: str, messages: int, round_: int) -> Measurement:
    """One cell: raises RelayUnavailable when the relay cannot deliver to SMTP servers yet."""
    sessions, pool_size = CELLS[name]
    result = Measurement("S", RELAY, KIB, round_, messages, variant=name)
    result.extra.update(sessions=sessions, pool_size=pool_size)
    return into_sink(result, workdir, sessions, RelayOptions(pool_size=pool_size))


def _runs(measurements: list[Measurement], name: str) -> list[Measurement]:
    return [m for m in measurements if m.scenario == "S" and m.variant == name]


def section(measurements: list[Measurement]) -> list[str]:
    """The grid, once per figure: rows client sessions, columns pool_size."""
    if not any(m.scenario == "S" for m in measurements):
        return []
    lines = ["S  scaling, relay -> smtp-sink, 1 KiB: median (min-max) over rounds"]
    for key, label in FIGURES:
        grid: list[tuple[str, ...]] = [(label, *(f"pool_size {p}" for p in POOL_SIZES))]
        for s in SESSIONS:
            cells = (report.cell(_runs(measurements, variant(s, p)), key).text
                     for p in POOL_SIZES)
            grid.append((sessions_label(s), *cells))
        lines += ["", report.columns(grid)]
    return lines


def summary(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """One entry per cell for the JSON: sessions, pool_size and each figure's cell."""
    rows = []
    for name, (sessions, pool_size) in CELLS.items():
        runs = _runs(measurements, name)
        if runs:
            rows.append({"sessions": sessions, "pool_size": pool_size,
                         **{key: vars(report.cell(runs, key)) for key, _ in FIGURES}})
    return rows
