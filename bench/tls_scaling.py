"""Scenario TS: scenario T for the relay alone, by client sessions, pool_size and workers.

A grid of client sessions (smtp-source -s N) by `[servers.sink] pool_size` (the
relay's connections to the upstream; 3 is Exchange Online's limit of concurrent
connections per mailbox) by `listener.workers` (1 and the default "auto"). Each
cell is a T measurement of the relay: a fresh upstream Postfix (STARTTLS, AUTH
PLAIN, discard), a fresh relay with those settings, 1 KiB messages, one per
client connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report
from bench.relay_instance import RelayOptions
from bench.scaling import sessions_label
from bench.scenarios import RELAY, Measurement
from bench.tls import end_to_end_tls

KIB = 1024
SESSIONS = (1, 20, 200)
POOL_SIZES = (1, 2, 3)
WORKERS: tuple[int | None, ...] = (1, None)
"""listener.workers: 1, and None for the default ("auto")."""
MESSAGES = {"full": 250, "quick": 150}
"""Per cell. Starting and stopping the upstream and the relay takes about 5 s a cell, so
the grid's 18 cells take about 5 minutes in 3 rounds (--quick: 1 round, 1.5 minutes)."""
FIGURES = (("end_to_end_per_s", "end-to-end msg/s"), ("cpu_ms_per_msg", "relay CPU ms/msg"),
           ("sessions_per_1000", "upstream sessions /1000 msg"))


def workers_label(workers: int | None) -> str:
    return f"workers {'auto' if workers is None else workers}"


def variant(sessions: int, pool_size: int, workers: int | None) -> str:
    return f"{sessions_label(sessions)}, pool_size {pool_size}, {workers_label(workers)}"


CELLS = {variant(s, p, w): (s, p, w) for w in WORKERS for s in SESSIONS for p in POOL_SIZES}
"""Every cell by its name, in the order they run."""


def messages(quick: bool, scale: float) -> int:
    return max(20, round(MESSAGES["quick" if quick else "full"] * scale))


def describe(count: int) -> str:
    return (f"TS as T for the relay alone, {count} messages of 1 KiB per cell: smtp-source "
            f"-s {'/'.join(map(str, SESSIONS))} by [servers.sink] pool_size "
            f"{'/'.join(map(str, POOL_SIZES))} by listener.workers 1/auto")


def cell(workdir: Path, name: str, count: int, round_: int) -> Measurement:
    sessions, pool_size, workers = CELLS[name]
    result = end_to_end_tls(workdir, RELAY, KIB, count, sessions, round_, name,
                            RelayOptions(pool_size=pool_size, workers=workers), scenario="TS")
    result.extra.update(sessions=sessions, pool_size=pool_size, workers=workers or "auto")
    return result


def _runs(measurements: list[Measurement], name: str) -> list[Measurement]:
    return [m for m in measurements if m.scenario == "TS" and m.variant == name]


def section(measurements: list[Measurement]) -> list[str]:
    """One grid per figure: rows client sessions and workers, columns pool_size."""
    if not any(m.scenario == "TS" for m in measurements):
        return []
    lines = ["TS scaling, relay -> upstream Postfix (STARTTLS, AUTH PLAIN), 1 KiB: "
             "median (min-max) over rounds"]
    for key, label in FIGURES:
        grid: list[tuple[str, ...]] = [(label, *(f"pool_size {p}" for p in POOL_SIZES))]
        for w in WORKERS:
            for s in SESSIONS:
                cells = (report.cell(_runs(measurements, variant(s, p, w)), key).text
                         for p in POOL_SIZES)
                grid.append((f"{sessions_label(s)}, {workers_label(w)}", *cells))
        lines += ["", report.columns(grid)]
    return lines


def summary(measurements: list[Measurement]) -> list[dict[str, Any]]:
    rows = []
    for name, (sessions, pool_size, workers) in CELLS.items():
        runs = _runs(measurements, name)
        if runs:
            rows.append({"sessions": sessions, "pool_size": pool_size,
                         "workers": workers or "auto",
                         **{key: vars(report.cell(runs, key)) for key, _ in FIGURES}})
    return rows
