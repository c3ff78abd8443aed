"""Turn measurements into one table: median and range per system, and their ratio."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bench.scenarios import POSTFIX, RELAY, SINGLE, Measurement, System

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Figure:
    scenario: str
    key: str
    label: str
    better: Better
    postfix_from: str = ""
    """The scenario whose Postfix figure this one is compared with (default: its own)."""
    postfix_key: str = ""
    """Postfix's figure it is compared with (default: the same key)."""


_HOP_FIGURES: tuple[tuple[str, str, Better], ...] = (
    ("end_to_end_per_s", "end-to-end msg/s", "higher"),
    ("cpu_ms_per_msg", "CPU ms/msg, whole instance", "lower"),
    ("accepted_per_s", "client finished, msg/s", "higher"),
    ("sessions_per_1000", "upstream sessions /1000 msg", "lower"),
    ("tls_handshakes_per_1000", "TLS handshakes /1000 msg", "lower"),
    ("tls_resumed_per_1000", "of them resumed /1000 msg", "higher"),
    ("auth_per_1000", "AUTH exchanges /1000 msg", "lower"),
    ("token_refreshes", "OAuth token refreshes", "lower"),
    ("upstream_cpu_ms_per_msg", "upstream's CPU ms/msg", "lower"),
    ("upstream_queue_wait_ms", "upstream's queue wait, mean ms", "lower"),
)
"""T's and X's figures: key, label, which is better."""

FIGURES = (
    Figure("A", "accepted_per_s", "accepted msg/s (smtp-source)", "higher"),
    Figure("A", "cpu_ms_per_msg", "relay CPU ms/msg", "lower"),
    Figure("A", "latency_p50_ms", "'.' to 250, p50 ms", "lower"),
    Figure("A", "latency_p99_ms", "'.' to 250, p99 ms", "lower"),
    Figure("B", "end_to_end_per_s", "end-to-end msg/s", "higher"),
    Figure("B", "cpu_ms_per_msg", "CPU ms/msg, whole instance", "lower"),
    Figure("B", "accepted_per_s", "client finished, msg/s", "higher"),
    Figure("B", "kernel_ms_per_msg", "kernel, uncharged ms/msg (machine)", "lower"),
    Figure("B", "latency_p50_ms", "'.' to 250, p50 ms", "lower"),
    Figure("B", "latency_p99_ms", "'.' to 250, p99 ms", "lower"),
    *(Figure(scenario, key, label, better) for scenario in ("T", "X")
      for key, label, better in _HOP_FIGURES),
    Figure("L", "end_to_end_per_s", "aiosmtplib alone msg/s (B end to end)", "higher", "B"),
    Figure("L", "cpu_ms_per_msg", "aiosmtplib alone CPU ms/msg (B)", "lower", "B"),
    Figure("L", "accepted_per_s", "aiosmtpd alone msg/s (B client)", "higher", "B"),
    Figure("L", "intake_cpu_ms_per_msg", "aiosmtpd alone CPU ms/msg (B)", "lower", "B",
           "cpu_ms_per_msg"),
    Figure("L", "libraries_cpu_ms_per_msg", "both libraries CPU ms/msg (B)", "lower", "B",
           "cpu_ms_per_msg"),
    Figure("L", "tls_per_s", "aiosmtplib STARTTLS+AUTH msg/s (T end to end)", "higher", "T",
           "end_to_end_per_s"),
    Figure("L", "tls_cpu_ms_per_msg", "aiosmtplib STARTTLS+AUTH CPU ms/msg (T)", "lower", "T",
           "cpu_ms_per_msg"),
)


@dataclass(frozen=True)
class Cell:
    text: str
    median: float | None = None
    low: float | None = None
    high: float | None = None
    count: int = 0


@dataclass(frozen=True)
class Row:
    figure: Figure
    size: int
    relay: Cell
    postfix: Cell
    ratio: float | None
    single: Cell = Cell("-")
    """The relay with listener.workers = 1 (scenario B)."""
    single_ratio: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.figure.scenario, "figure": self.figure.key,
            "label": self.figure.label, "better": self.figure.better, "size": self.size,
            "sysmail-relay": vars(self.relay), "postfix": vars(self.postfix),
            "ratio_relay_to_postfix": self.ratio,
            "sysmail-relay workers=1": vars(self.single),
            "ratio_workers_1_to_postfix": self.single_ratio,
        }


def size_label(size: int) -> str:
    if not size:
        return "-"
    if size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MiB"
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summarize(measurements: list[Measurement], sizes: list[int]) -> list[Row]:
    rows: list[Row] = []
    measured = {m.scenario for m in measurements}
    for figure in FIGURES:
        if figure.scenario not in measured:
            continue
        for size in sizes:
            relay = _cell(measurements, figure, size, RELAY)
            postfix = _cell(measurements, figure, size, POSTFIX, postfix=True)
            single = _cell(measurements, figure, size, RELAY, SINGLE)
            own = relay.count or relay.text != "-"
            borrowed = figure.postfix_from  # another scenario's Postfix: not a row alone
            if own or (not borrowed and (postfix.count or postfix.text != "-")):
                rows.append(Row(figure, size, relay, postfix, _ratio(relay, postfix),
                                single, _ratio(single, postfix)))
    return rows


def _ratio(relay: Cell, postfix: Cell) -> float | None:
    return relay.median / postfix.median if relay.median is not None and postfix.median \
        else None


def _cell(measurements: list[Measurement], figure: Figure, size: int, system: System,
          variant: str = "", postfix: bool = False) -> Cell:
    scenario = figure.postfix_from if postfix and figure.postfix_from else figure.scenario
    key = figure.postfix_key if postfix and figure.postfix_key else figure.key
    runs = [m for m in measurements if m.scenario == scenario and m.size == size
            and m.system == system and m.variant == variant]
    return cell(runs, key)


def cell(runs: list[Measurement], key: str) -> Cell:
    """Median (lowest-highest) of figure *key* over *runs*; '-' without runs; the statuses
    when none produced it; '[n failed]' for the runs that did not."""
    if not runs:
        return Cell("-")
    values = [m.figures[key] for m in runs if m.status == "ok" and key in m.figures]
    if not values:  # '-' when the runs went well but do not have this figure
        statuses = sorted({m.status for m in runs if m.status != "ok"})
        return Cell(", ".join(statuses) or "-")
    median, low, high = statistics.median(values), min(values), max(values)
    text = number(median) if len(values) == 1 else \
        f"{number(median)} ({number(low)}-{number(high)})"
    failed = len(runs) - len(values)
    if failed:
        text += f" [{failed} failed]"
    return Cell(text, median, low, high, len(values))


def table(rows: list[Row]) -> str:
    header = ("", "figure", "size", "sysmail-relay", "postfix", "relay/postfix",
              "workers=1", "workers=1/postfix")
    lines = [header]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x ({row.figure.better} is better)"
        single = "-" if row.single_ratio is None else f"{row.single_ratio:.2f}x"
        lines.append((row.figure.scenario, row.figure.label, size_label(row.size),
                      row.relay.text, row.postfix.text, ratio, row.single.text, single))
    return columns(lines)


def columns(lines: Sequence[Sequence[str]]) -> str:
    """Aligned columns; the first line is the header, underlined."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
