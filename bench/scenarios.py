"""One measurement each: scenario A (acceptance into the outbox) and B (end to end).

Every function starts what it measures in a fresh directory, measures once, and
stops everything it started before returning, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from bench import load
from bench.nullclient import start_null_client
from bench.procstat import (
    kernel_threads,
    kernel_threads_cpu_seconds,
    machine_cpu_seconds,
    own_cpu_seconds,
)
from bench.relay_instance import DEFAULTS, RelayInstance, RelayOptions, start_relay
from bench.sink import CountingSink

System = Literal["sysmail-relay", "postfix"]
RELAY: Final = "sysmail-relay"
POSTFIX: Final = "postfix"
Status = Literal["ok", "error", "not available"]
SINK_POLL = 0.005  # seconds between looks at the sink's counter: the end-to-end clock
DRAIN_POLL = 0.02  # seconds between looks at a queue (scanning it costs the harness CPU)


@dataclass
class Measurement:
    scenario: str
    system: System
    size: int
    round: int
    messages: int
    figures: dict[str, float] = field(default_factory=dict)
    status: Status = "ok"
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    """Which measurement of a scenario that has several: M 'idle', S '20 client sessions,
    pool_size 2'."""


class Instance(Protocol):
    """What scenario B needs from the system under test."""

    @property
    def port(self) -> int: ...

    def alive(self) -> bool: ...

    def cpu_seconds(self) -> float: ...

    def pending(self) -> int: ...

    def failed(self) -> int: ...

    def stop(self) -> None: ...

    def log_tail(self, lines: int = 20) -> str: ...

    def process_names(self) -> dict[str, int]: ...


class Upstream(Protocol):
    """What the system under test delivers into: smtp-sink (B, S), or the Postfix that
    wants STARTTLS and a login (T, X: bench/upstream.py)."""

    name: str

    def received(self) -> int: ...

    def cpu_seconds(self) -> float: ...

    def exit_status(self) -> int | None: ...


class MeasurementError(Exception):
    pass


def time_limit(messages: int) -> float:
    """Seconds one pass may take before it is given up: generous, but bounded."""
    return 30.0 + messages / 40.0


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             check: Callable[[], None] = lambda: None) -> None:
    """Poll *condition*; *check* raises MeasurementError when waiting is pointless."""
    deadline = time.monotonic() + timeout
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise MeasurementError(f"{what}: not reached after {timeout:.0f} s")
        time.sleep(DRAIN_POLL)


class Background:
    """What else the machine did during a measurement, in cores (0.1 = 10 % of one core).

    `kernel`: kernel threads (writeback, journal) and interrupt time (softirq:
    loopback TCP), charged to no process, much of it on behalf of the
    measurement. `others`: everything busy minus that and minus what the
    measurement itself used (the system under test, the sink, this harness and
    its clients); other people's test suites on a shared machine show up here,
    not in the figures.
    """

    def __init__(self, *measured: Callable[[], float]) -> None:
        self._measured = measured
        self._threads = kernel_threads()
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        ours = own_cpu_seconds() + sum(f() for f in self._measured)
        busy, interrupts = machine_cpu_seconds()
        return time.monotonic(), busy, interrupts, ours

    def record(self, result: Measurement) -> None:
        now, busy, interrupts, ours = self._sample()
        t0, busy0, interrupts0, ours0 = self._start
        wall = max(now - t0, 1e-6)
        kernel = (interrupts - interrupts0) + kernel_threads_cpu_seconds(self._threads,
                                                                         kernel_threads())
        others = max(0.0, (busy - busy0) - kernel - (ours - ours0))
        result.extra["kernel_cpu_s"] = kernel
        result.extra["kernel_cores"] = kernel / wall
        result.extra["background_cores"] = others / wall


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 is a latency that happened)."""
    ordered = sorted(values)
    rank = min(max(1, math.ceil(fraction * len(ordered))), len(ordered))
    return ordered[rank - 1]


@contextlib.contextmanager
def measuring(result: Measurement, instance: Instance) -> Iterator[None]:
    """Stop *instance* on leaving. A MeasurementError inside ends the block and marks
    *result* as failed, with the reason and the end of the instance's log."""
    try:
        yield
    except MeasurementError as e:
        result.status, result.detail = "error", f"{e}\n{instance.log_tail(5)}"
    finally:
        instance.stop()


# --- scenario A: the relay's listener, into the local outbox ----------------------------

def acceptance(workdir: Path, size: int, messages: int, latency_messages: int,
               sessions: int, round_: int) -> Measurement:
    result = Measurement("A", RELAY, size, round_, messages)
    relay = start_relay(workdir)
    result.extra["relay_code"] = relay.code
    with measuring(result, relay):
        background = Background(relay.cpu_seconds)
        _throughput_into_outbox(relay, result, size, messages, sessions)
        _latency(relay, result, size, latency_messages, sessions)
        background.record(result)
    return result


def _throughput_into_outbox(relay: RelayInstance, result: Measurement, size: int,
                            messages: int, sessions: int) -> None:
    cpu0, started = relay.cpu_seconds(), time.perf_counter()
    with load.smtp_source(relay.port, messages, size, sessions) as source:
        code, output = load.finish(source, time_limit(messages))
    elapsed = time.perf_counter() - started
    if code != 0:
        raise MeasurementError(f"smtp-source exited with {code}: {output.strip()[-500:]}")
    wait_for(lambda: relay.pending() == 0 and relay.outbox_count() >= messages,
             time_limit(messages), f"{messages} messages in the outbox", still_running(relay))
    cpu = relay.cpu_seconds() - cpu0
    result.figures["accepted_per_s"] = messages / elapsed
    result.figures["cpu_ms_per_msg"] = cpu * 1000 / messages
    result.extra["smtp_source_seconds"] = elapsed
    result.extra["dead"] = relay.failed()


def _latency(instance: Instance, result: Measurement, size: int, messages: int,
             sessions: int) -> None:
    try:
        lat = load.measure_latency(instance.port, messages, size, sessions, time_limit(messages))
    except TimeoutError:
        raise MeasurementError("latency pass: time limit reached") from None
    if not lat.latencies:
        raise MeasurementError(f"latency pass: nothing accepted: {lat.errors[:3]}")
    ms = [s * 1000 for s in lat.latencies]
    result.figures["latency_p50_ms"] = statistics.median(ms)
    result.figures["latency_p99_ms"] = percentile(ms, 0.99)
    result.extra.update(
        latency_messages=len(ms), latency_max_ms=max(ms), latency_errors=lat.errors[:5],
        latency_client_per_s=len(ms) / lat.seconds,
        latency_client_cpu_ms_per_msg=lat.client_cpu_seconds * 1000 / len(ms))


# --- scenario B: end to end into smtp-sink, the relay or a Postfix null client ------------

SINGLE = "workers=1"
"""The variant of B with the relay in one process (`listener.workers = 1`)."""


def end_to_end(workdir: Path, system: System, size: int, messages: int, sessions: int,
               round_: int, latency_messages: int = 0, variant: str = "") -> Measurement:
    """Throughput, then (latency_messages > 0) '.' to 250 with the same load, both on one
    instance. Raises RelayUnavailable when the relay cannot deliver to SMTP servers yet.
    `variant` SINGLE: the relay with one process instead of its default."""
    options = RelayOptions(workers=1) if variant == SINGLE else DEFAULTS
    return into_sink(Measurement("B", system, size, round_, messages, variant=variant),
                     workdir, sessions, options, latency_messages=latency_messages)


def into_sink(result: Measurement, workdir: Path, sessions: int,
              options: RelayOptions = DEFAULTS, latency_messages: int = 0) -> Measurement:
    """*result*'s messages through a fresh system under test (the relay started with
    *options*) into a fresh smtp-sink; fills in *result*'s figures."""
    with CountingSink(workdir / "sink.log") as sink:
        instance = _start(result.system, workdir, sink.port, result, options)
        with measuring(result, instance):
            relay_through(instance, sink, result, result.size, result.messages, sessions)
            if latency_messages:
                _latency(instance, result, result.size, latency_messages, sessions)
    return result


def start_relay_into(workdir: Path, sink_port: int, result: Measurement,
                     options: RelayOptions = DEFAULTS) -> RelayInstance:
    """The relay delivering into *sink_port*; its code version goes into *result*."""
    relay = start_relay(workdir / "relay", sink_port, options=options)
    result.extra["relay_code"] = relay.code
    return relay


def _start(system: System, workdir: Path, sink_port: int, result: Measurement,
           options: RelayOptions) -> Instance:
    if system == RELAY:
        return start_relay_into(workdir, sink_port, result, options)
    return start_null_client(workdir / "postfix", sink_port)


def still_running(instance: Instance, sink: Upstream | None = None) -> Callable[[], None]:
    """A check for `wait_for`: fail at once when a process the measurement needs has died
    (on a shared machine something else may kill it)."""

    def check() -> None:
        if not instance.alive():
            raise MeasurementError(f"the system under test exited during the measurement:\n"
                                   f"{instance.log_tail(5)}")
        status = sink.exit_status() if sink is not None else None
        if sink is not None and status is not None:
            how = f"signal {-status}" if status < 0 else f"exit code {status}"
            raise MeasurementError(f"{sink.name} ended during the measurement ({how}); "
                                   "something else on the machine may have killed it")

    return check


def _wait_for_sink(instance: Instance, sink: Upstream, source: subprocess.Popen[bytes],
                   total: int, started: float, limit: float) -> float | None:
    """Poll until the sink has *total*; returns when smtp-source finished, if it did."""
    client_done: float | None = None
    deadline = time.monotonic() + limit
    check = still_running(instance, sink)
    while sink.received() < total and time.monotonic() < deadline:
        check()
        if client_done is None and source.poll() is not None:
            client_done = time.perf_counter() - started
            if source.returncode != 0:
                break
        time.sleep(SINK_POLL)
    return client_done


def relay_through(instance: Instance, sink: Upstream, result: Measurement, size: int,
                  messages: int, sessions: int) -> None:
    """One smtp-source pass through *instance* into *sink* (which may have counted earlier
    passes); returns when the sink has all and the queue is empty."""
    limit = time_limit(messages)
    total = sink.received() + messages
    background = Background(instance.cpu_seconds, sink.cpu_seconds)
    cpu0, started = instance.cpu_seconds(), time.perf_counter()
    with load.smtp_source(instance.port, messages, size, sessions) as source:
        client_done = _wait_for_sink(instance, sink, source, total, started, limit)
        at_sink = time.perf_counter() - started
        code, output = load.finish(source, limit)
        if client_done is None:  # the sink had everything before smtp-source exited
            client_done = time.perf_counter() - started
    if code != 0:
        raise MeasurementError(f"smtp-source exited with {code}: {output.strip()[-500:]}")
    if sink.received() < total:
        raise MeasurementError(f"the sink received {messages - (total - sink.received())} "
                               f"of {messages} in {limit:.0f} s")
    wait_for(lambda: instance.pending() == 0, limit, "an empty queue after delivery",
             still_running(instance, sink))
    cpu = instance.cpu_seconds() - cpu0
    background.record(result)
    result.figures["end_to_end_per_s"] = messages / at_sink
    result.figures["cpu_ms_per_msg"] = cpu * 1000 / messages
    result.figures["accepted_per_s"] = messages / client_done
    result.figures["kernel_ms_per_msg"] = float(result.extra["kernel_cpu_s"]) * 1000 / messages
    result.extra.update(seconds_to_sink=at_sink, smtp_source_seconds=client_done,
                        failed=instance.failed(), processes=instance.process_names())
