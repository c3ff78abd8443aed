"""Scenario M: the relay's memory and start-up (issue 10), one measurement of each.

    idle     RSS of an idle relay, then with N connections that said EHLO and wait
    idle1    the same with `listener.workers = 1` (one process: the least memory)
    growth   RSS after a first pass of messages into smtp-sink, and after the rest
             (the same process): does it grow with the messages it has relayed?
    big      peak RSS growth while one large message is received and relayed
    startup  process start to the 220 greeting, and RSS once the queue is indexed,
             with N messages in the spool and with an empty one

Each starts a fresh relay (and smtp-sink where mail flows) and stops it before
returning, also on errors and Ctrl-C. RSS is VmRSS of the relay's process plus
its intake workers', the peak their VmHWM (/proc/PID/status), summed.
"""

from __future__ import annotations

import resource
import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import load, report
from bench.prepared_spool import fill_spool
from bench.relay_instance import RelayInstance, RelayOptions, start_relay
from bench.scenarios import (
    RELAY,
    Measurement,
    MeasurementError,
    measuring,
    relay_through,
    start_relay_into,
    still_running,
    time_limit,
    wait_for,
)
from bench.sink import CountingSink

KIB, MIB = 1024, 1024 * 1024
SETTLE = 1.0  # seconds between opening the last idle connection and reading RSS
HELD = "relay_queue_messages{state=\"held\"}"


@dataclass(frozen=True)
class FootprintPlan:
    connections: int
    growth_first: int
    growth_total: int
    spooled: int
    big_size: int = 25 * MIB
    spooled_size: int = 10 * KIB
    sessions: int = 20

    def scaled(self, factor: float) -> FootprintPlan:
        """Message counts times *factor* (connections and sizes stay)."""
        first = max(20, round(self.growth_first * factor))
        return replace(self, growth_first=first,
                       growth_total=max(first + 20, round(self.growth_total * factor)),
                       spooled=max(20, round(self.spooled * factor)))


FULL = FootprintPlan(connections=1000, growth_first=10_000, growth_total=100_000,
                     spooled=100_000)
QUICK = FootprintPlan(connections=1000, growth_first=1000, growth_total=10_000,
                      spooled=10_000)


def parts(plan: FootprintPlan) -> list[tuple[str, int, int]]:
    """(part, message size, messages) of each measurement, in the order they run."""
    return [("idle", 0, plan.connections), ("idle1", 0, plan.connections),
            ("growth", KIB, plan.growth_total),
            ("big", plan.big_size, 1), ("startup", plan.spooled_size, plan.spooled)]


def describe(plan: FootprintPlan) -> str:
    return (f"M  once: {plan.connections} idle connections; {plan.growth_first} then "
            f"{plan.growth_total} messages of 1 KiB into smtp-sink ({plan.sessions} "
            f"sessions); one {report.size_label(plan.big_size)} message; start-up with "
            f"{plan.spooled} queued messages of {report.size_label(plan.spooled_size)}")


def measure(part: str, workdir: Path, plan: FootprintPlan) -> Measurement:
    run: dict[str, Callable[[Path, FootprintPlan], Measurement]] = {
        "idle": idle_connections, "idle1": one_process_idle, "growth": growth,
        "big": big_message, "startup": startup}
    return run[part](workdir, plan)


def _part(part: str, plan: FootprintPlan) -> Measurement:
    """The (empty) result of *part*."""
    size, messages = {name: (size, n) for name, size, n in parts(plan)}[part]
    return Measurement("M", RELAY, size, 1, messages, variant=part)


def _ready(relay: RelayInstance, check: Callable[[], bool] = lambda: True,
           what: str = "the admin listener answering", timeout: float = 20.0) -> None:
    """Wait until /metrics answers (the relay has started completely) and *check* holds."""

    def answered() -> bool:
        try:
            relay.metrics()
        except OSError:
            return False
        return check()

    wait_for(answered, timeout, what, still_running(relay))


# --- idle connections ---------------------------------------------------------------------

def allow_open_files(count: int) -> None:
    """Raise RLIMIT_NOFILE to *count* for this process and the relay it starts next."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, max(hard, count)))


def idle_connections(workdir: Path, plan: FootprintPlan, part: str = "idle",
                     workers: int | None = None) -> Measurement:
    n = plan.connections
    result = _part(part, plan)
    allow_open_files(n + 256)  # the harness and the relay each hold n sockets
    relay = start_relay(workdir / "relay",
                        options=RelayOptions(max_connections=n, workers=workers))
    result.extra["relay_code"] = relay.code
    with measuring(result, relay):
        _ready(relay)
        result.figures["rss_idle_mib"] = rss_idle = relay.memory_mib()

        def while_open() -> None:
            time.sleep(SETTLE)
            result.figures["rss_connections_mib"] = relay.memory_mib()
            result.extra["relay_smtp_sessions"] = relay.metrics().get("relay_smtp_sessions")

        held = load.hold_idle_sessions(relay.port, n, while_open, time_limit(n))
        result.figures["not_greeted"] = n - held.greeted
        result.figures["kib_per_connection"] = \
            (result.figures["rss_connections_mib"] - rss_idle) * KIB / max(held.greeted, 1)
        result.extra.update(connections=n, greeted=held.greeted, errors=held.errors[:5],
                            seconds_to_open=held.seconds_to_open)
    return result


def one_process_idle(workdir: Path, plan: FootprintPlan) -> Measurement:
    return idle_connections(workdir, plan, "idle1", workers=1)


# --- growth -------------------------------------------------------------------------------

def growth(workdir: Path, plan: FootprintPlan) -> Measurement:
    """The messages in passes of `growth_first`, RSS after each: every pass builds the
    same backlog, so the readings differ by what the relay keeps, not by the load."""
    first = plan.growth_first
    passes = max(2, plan.growth_total // first)
    result = _part("growth", plan)
    result.extra.update(first=first, total=passes * first)
    with CountingSink(workdir / "sink.log") as sink:
        relay = start_relay_into(workdir, sink.port, result)
        with measuring(result, relay):
            readings, figures = [], []
            for _ in range(passes):
                one = Measurement("M", RELAY, KIB, 1, first, variant="growth")
                relay_through(relay, sink, one, KIB, first, plan.sessions)
                readings.append(relay.memory_mib())
                figures.append({"failed": one.extra["failed"], **one.figures})
            result.extra.update(rss_after_each_pass_mib=readings, passes=figures)
            result.figures["rss_first_mib"] = readings[0]
            result.figures["rss_total_mib"] = readings[-1]
            result.figures["growth_pct"] = (readings[-1] / readings[0] - 1) * 100
    return result


# --- one large message ----------------------------------------------------------------------

def big_message(workdir: Path, plan: FootprintPlan) -> Measurement:
    data = load.message_bytes(plan.big_size)
    result = _part("big", plan)
    options = RelayOptions(max_message_size=len(data) + MIB)  # room for the added headers
    result.extra.update(message_bytes=len(data), max_message_size=options.max_message_size)
    with CountingSink(workdir / "sink.log") as sink:
        relay = start_relay_into(workdir, sink.port, result, options)
        with measuring(result, relay):
            _ready(relay)
            result.figures["rss_before_mib"] = before = relay.memory_mib()
            relay.reset_peak_memory()
            try:
                load.send_message(relay.port, data, time_limit(1))
            except smtplib.SMTPException as e:
                raise MeasurementError(f"the relay refused the message: {e}") from None
            wait_for(lambda: sink.received() >= 1 and relay.pending() == 0, time_limit(1),
                     "the large message at the sink", still_running(relay, sink))
            result.extra["sink_received"] = sink.received()
            result.figures["rss_peak_mib"] = peak = relay.memory_mib("VmHWM")
            result.figures["peak_growth_mib"] = peak - before
            result.figures["peak_growth_ratio"] = (peak - before) * MIB / len(data)
            result.figures["rss_after_mib"] = relay.memory_mib()
    return result


# --- start-up with a full spool -------------------------------------------------------------

def startup(workdir: Path, plan: FootprintPlan) -> Measurement:
    n = plan.spooled
    result = _part("startup", plan)
    result.extra.update(spooled=n, body_kib=plan.spooled_size // KIB)
    _start_held(workdir / "empty", 0, result, "empty")
    if result.status != "ok":
        return result
    started = time.monotonic()
    fill_spool(workdir / "queued" / "state", n, plan.spooled_size)
    result.extra["seconds_to_fill"] = time.monotonic() - started
    _start_held(workdir / "queued", n, result, "queued")
    if result.status == "ok":
        grown = (result.figures["queued_rss_mib"] - result.figures["empty_rss_mib"]) * MIB
        result.figures["bytes_per_queued"] = grown / n
        result.figures["pct_of_body"] = grown / n / plan.spooled_size * 100
    return result


def _start_held(directory: Path, queued: int, result: Measurement, name: str) -> None:
    """Start the relay with the account inactive (nothing is sent) over the spool in
    *directory*; time the 220 greeting and the index, then read RSS."""
    limit = time_limit(queued)
    relay = start_relay(directory, timeout=limit, options=RelayOptions(active=False))
    result.extra["relay_code"] = relay.code
    with measuring(result, relay):
        reply = load.greeting(relay.port, limit)
        result.figures[f"{name}_seconds_to_220"] = time.monotonic() - relay.started
        if not reply.startswith(b"220"):
            raise MeasurementError(f"greeting: {reply!r}")
        _ready(relay, lambda: relay.metrics().get(HELD) == queued,
               f"{queued} held messages in {HELD}", limit)
        result.figures[f"{name}_seconds_to_indexed"] = time.monotonic() - relay.started
        result.figures[f"{name}_rss_mib"] = relay.memory_mib()


# --- the figures and their targets (issue 10) -------------------------------------------------

@dataclass(frozen=True)
class Figure:
    part: str
    key: str
    label: str
    """formatted with the measurement's extra: {connections}, {first}, {spooled}, ..."""
    unit: str
    limit: float | None = None
    """issue 10's target: met when the value is at most this"""

    def target(self) -> str:
        return "" if self.limit is None else f"<= {self.limit:g} {self.unit}".rstrip()


FIGURES = (
    Figure("idle", "rss_idle_mib", "RSS, idle relay", "MiB"),
    Figure("idle", "rss_connections_mib", "RSS with {connections:,} idle connections", "MiB",
           80),
    Figure("idle", "not_greeted", "  of them without 220 and 250 to EHLO", "", 0),
    Figure("idle", "kib_per_connection", "  RSS per connection", "KiB"),
    Figure("idle1", "rss_idle_mib", "RSS, idle relay, listener.workers = 1", "MiB"),
    Figure("idle1", "rss_connections_mib", "  with {connections:,} idle connections", "MiB",
           80),
    Figure("growth", "rss_first_mib", "RSS after {first:,} messages into smtp-sink", "MiB"),
    Figure("growth", "rss_total_mib", "RSS after {total:,} (the same process)", "MiB"),
    Figure("growth", "growth_pct", "  growth", "%", 10),
    Figure("big", "rss_before_mib", "RSS before one {size} message", "MiB"),
    Figure("big", "peak_growth_mib", "  peak RSS growth while relaying it", "MiB"),
    Figure("big", "peak_growth_ratio", "  peak growth / message size", "x", 2),
    Figure("big", "rss_after_mib", "  RSS after it was relayed", "MiB"),
    Figure("startup", "empty_seconds_to_220", "start-up, empty spool: process start to 220",
           "s"),
    Figure("startup", "empty_rss_mib", "  RSS", "MiB"),
    Figure("startup", "queued_seconds_to_220",
           "start-up, {spooled:,} queued ({body_kib} KiB): process start to 220", "s", 2),
    Figure("startup", "queued_seconds_to_indexed", "  to all of them indexed (/metrics)", "s"),
    Figure("startup", "queued_rss_mib", "  RSS", "MiB"),
    Figure("startup", "bytes_per_queued", "  memory per queued message", "B"),
    Figure("startup", "pct_of_body", "  memory per queued message / its body", "%", 50),
)


def summary(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Every figure of scenario M measured, with its target and whether it was met."""
    by_part = {m.variant: m for m in measurements if m.scenario == "M"}
    rows = []
    for f in FIGURES:
        m = by_part.get(f.part)
        if m is None:
            continue
        value = m.figures.get(f.key)
        met = None if f.limit is None or value is None else value <= f.limit
        label = f.label.format(size=report.size_label(m.size), **m.extra)
        rows.append({"part": f.part, "figure": f.key, "label": label, "value": value,
                     "unit": f.unit, "target": f.target() or None, "met": met,
                     "status": m.status})
    return rows


def section(measurements: list[Measurement]) -> list[str]:
    """Memory and start-up: each figure, issue 10's target and whether it was met."""
    rows = summary(measurements)
    if not rows:
        return []
    lines: list[tuple[str, ...]] = [("M  memory and start-up", "measured", "target", "met")]
    for row in rows:
        value = row["value"]
        measured = row["status"] if value is None else _shown(value, row["unit"])
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append((row["label"], measured.rstrip(), row["target"] or "", met))
    return [report.columns(lines)]


def _shown(value: float, unit: str) -> str:
    if not unit:  # a count
        return f"{value:,.0f}"
    return f"{report.number(value)} {unit}"
