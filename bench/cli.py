"""`bench/run.py`: run scenarios A, B, L, S, T, X and TS interleaved, then M; print the
tables, save them."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import footprint, library, machine, report, scaling, tls, tls_scaling
from bench.footprint import FootprintPlan
from bench.load import smtp_source_command
from bench.procstat import process_tree, processes_mentioning
from bench.relay_instance import DEFAULTS, RelayOptions, RelayUnavailable
from bench.scenarios import (
    POSTFIX,
    RELAY,
    SINGLE,
    Measurement,
    Status,
    System,
    acceptance,
    end_to_end,
)

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
SIZES = (1 * KIB, 100 * KIB)
BUSY_MACHINE = 0.25  # cores of background load above which the run is flagged
SCENARIOS = ("A", "B", "L", "M", "S", "T", "X", "TS")
ISSUE_10 = ("A", "B", "M", "S")
"""What --all runs."""
DEFAULT_SCENARIOS = ("A", "B")


@dataclass(frozen=True)
class Plan:
    rounds: int
    sessions: int
    accept_messages: dict[int, int]
    latency_messages: dict[int, int]
    relay_messages: dict[int, int]
    scenarios: tuple[str, ...]
    scaling_messages: int
    """messages per cell of the S grid"""
    footprint: FootprintPlan
    tls_messages: dict[int, int]
    """messages per T and X measurement, by size"""
    tls_scaling_messages: int
    """messages per cell of the TS grid"""
    postfix_tls_reuse: bool = True
    """T's null client with smtp_tls_connection_reuse = yes"""

    @property
    def sizes(self) -> list[int]:
        return list(SIZES)


@dataclass(frozen=True)
class Counts:
    """Messages per pass, by message size."""

    accept: dict[int, int]
    latency: dict[int, int]
    relay: dict[int, int]

    def scaled(self, factor: float) -> Counts:
        def scale(counts: dict[int, int]) -> dict[int, int]:
            return {size: max(20, round(n * factor)) for size, n in counts.items()}

        return Counts(scale(self.accept), scale(self.latency), scale(self.relay))


FULL = Counts(accept={KIB: 3000, 100 * KIB: 1000}, latency={KIB: 2000, 100 * KIB: 800},
              relay={KIB: 3000, 100 * KIB: 1000})
QUICK = Counts(accept={KIB: 600, 100 * KIB: 200}, latency={KIB: 400, 100 * KIB: 200},
               relay={KIB: 600, 100 * KIB: 200})
SCALING_MESSAGES = {"full": 2000, "quick": 300}


def make_plan(args: argparse.Namespace) -> Plan:
    counts = (QUICK if args.quick else FULL).scaled(args.scale)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    grid = max(20, round(SCALING_MESSAGES["quick" if args.quick else "full"] * args.scale))
    memory = (footprint.QUICK if args.quick else footprint.FULL).scaled(args.scale)
    return Plan(rounds, args.sessions, counts.accept, counts.latency, counts.relay,
                tuple(ISSUE_10 if args.all else args.only or DEFAULT_SCENARIOS), grid, memory,
                tls.counts(args.quick, args.scale), tls_scaling.messages(args.quick, args.scale),
                args.postfix_tls_reuse == "yes")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="sysmail-relay benchmark: A) acceptance into the local outbox, "
                    "B) end to end into smtp-sink, side by side with a Postfix null client; "
                    "on request M) memory and start-up, S) scaling by client sessions and "
                    "upstream pool_size, T) end to end through STARTTLS and AUTH PLAIN beside "
                    "the null client, X) the same with XOAUTH2, TS) T's scaling, L) the "
                    "relay's SMTP libraries alone (beside B's and T's Postfix).")
    p.add_argument("--quick", action="store_true",
                   help="1 round with fewer messages (under a minute)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default 3, --quick 1)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent client sessions")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every message count (e.g. 0.5 or 2)")
    p.add_argument("--only", choices=SCENARIOS, action="append",
                   help="run only this scenario (repeatable; default A and B)")
    p.add_argument("--postfix-tls-reuse", choices=("yes", "no"), default="yes",
                   help="T: the null client's smtp_tls_connection_reuse (default yes)")
    p.add_argument("--all", action="store_true",
                   help="issue 10's scenarios: A, B, M and S (about 6 minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="directory for <UTC timestamp>.json and .txt (default bench/results)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, logs, queues) for inspection")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.all and args.only:
        p.error("--all runs every scenario; leave out --only")
    return args


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass(frozen=True)
class Job:
    scenario: str
    system: System
    size: int
    round: int
    messages: int
    variant: str = ""

    def placeholder(self, status: Status, detail: str) -> Measurement:
        return Measurement(self.scenario, self.system, self.size, self.round, self.messages,
                           status=status, detail=detail, variant=self.variant)


class Runner:
    """Runs the plan round by round, then M once; remembers when the relay cannot
    deliver to SMTP servers (scenarios B and S)."""

    def __init__(self, plan: Plan, work: Path, keep: bool = False) -> None:
        self.plan = plan
        self.work = work
        self.keep = keep
        self.measurements: list[Measurement] = []
        self.relay_unavailable: str | None = None

    def jobs(self) -> list[Job]:
        plan, jobs = self.plan, []
        for round_ in range(1, plan.rounds + 1):
            for size in plan.sizes:
                if "A" in plan.scenarios:
                    jobs.append(Job("A", RELAY, size, round_, plan.accept_messages[size]))
                if "B" in plan.scenarios:
                    jobs += [Job("B", system, size, round_, plan.relay_messages[size], variant)
                             for system, variant in _order(round_)]
                if "L" in plan.scenarios:
                    jobs.append(Job("L", RELAY, size, round_, plan.relay_messages[size]))
            if "S" in plan.scenarios:
                cells = list(scaling.CELLS) if round_ % 2 else list(reversed(scaling.CELLS))
                jobs += [Job("S", RELAY, KIB, round_, plan.scaling_messages, name)
                         for name in cells]
            jobs += tls_jobs(plan, round_)
        if "M" in plan.scenarios:
            jobs += [Job("M", RELAY, size, 1, messages, part)
                     for part, size, messages in footprint.parts(plan.footprint)]
        return jobs

    def run(self) -> None:
        for job in self.jobs():
            directory = Path(tempfile.mkdtemp(prefix=f"r{job.round}-", dir=self.work))
            started = time.monotonic()
            try:
                result = self._measure(job, directory)
            except RelayUnavailable as e:
                self.relay_unavailable = str(e)
                result = job.placeholder("not available", str(e))
            except (RuntimeError, TimeoutError, OSError) as e:
                result = job.placeholder("error", f"{type(e).__name__}: {e}")
            finally:
                if not self.keep:
                    shutil.rmtree(directory, ignore_errors=True)
            result.extra["wall_seconds"] = round(time.monotonic() - started, 2)
            self.measurements.append(result)
            print(progress_line(result, self.plan.rounds), flush=True)

    def _measure(self, job: Job, directory: Path) -> Measurement:
        if job.scenario == "A":
            return acceptance(directory, job.size, job.messages,
                              self.plan.latency_messages[job.size], self.plan.sessions,
                              job.round)
        if job.scenario == "M":
            return footprint.measure(job.variant, directory, self.plan.footprint)
        if job.scenario == "L":
            return library.measure(directory, job.size, job.messages, job.round,
                                   library.default_pool_size(), self.plan.sessions)
        if job.system == RELAY and self.relay_unavailable is not None:
            return job.placeholder("not available", self.relay_unavailable)
        if job.scenario == "S":
            return scaling.cell(directory, job.variant, job.messages, job.round)
        if job.scenario == "T":
            return tls.end_to_end_tls(directory, job.system, job.size, job.messages,
                                      self.plan.sessions, job.round, job.variant,
                                      RelayOptions(workers=1) if job.variant == SINGLE
                                      else DEFAULTS, postfix_tls_reuse=self.plan.postfix_tls_reuse)
        if job.scenario == "X":
            return tls.xoauth2(directory, job.size, job.messages, self.plan.sessions, job.round)
        if job.scenario == "TS":
            return tls_scaling.cell(directory, job.variant, job.messages, job.round)
        return end_to_end(directory, job.system, job.size, job.messages, self.plan.sessions,
                          job.round, self.plan.latency_messages[job.size], job.variant)


def tls_jobs(plan: Plan, round_: int) -> list[Job]:
    """T (both systems, as B), X and the TS grid in one round."""
    jobs = []
    for size in plan.sizes:
        if "T" in plan.scenarios:
            jobs += [Job("T", system, size, round_, plan.tls_messages[size], variant)
                     for system, variant in _order(round_)]
        if "X" in plan.scenarios:
            jobs.append(Job("X", RELAY, size, round_, plan.tls_messages[size]))
    if "TS" in plan.scenarios:
        cells = list(tls_scaling.CELLS)
        jobs += [Job("TS", RELAY, KIB, round_, plan.tls_scaling_messages, name)
                 for name in (cells if round_ % 2 else cells[::-1])]
    return jobs


def _order(round_: int) -> list[tuple[System, str]]:
    """The relay (its default, and with workers = 1) and Postfix, the order reversed every
    other round, so drift over the run hits them alike."""
    order: list[tuple[System, str]] = [(RELAY, ""), (POSTFIX, ""), (RELAY, SINGLE)]
    return order if round_ % 2 else order[::-1]


def progress_line(m: Measurement, rounds: int) -> str:
    when = "once" if m.scenario == "M" else f"round {m.round}/{rounds}"
    head = (f"{when:<11}  {m.scenario}  {report.size_label(m.size):>7}  "
            f"{m.system:<13}{'  ' + m.variant if m.variant else ''}")
    if m.status != "ok":
        return f"{head}  {m.status}: {m.detail.splitlines()[0] if m.detail else ''}"
    figures = ", ".join(f"{key} {report.number(value)}" for key, value in m.figures.items())
    return f"{head}  {figures}  ({m.extra.get('wall_seconds', 0):.1f} s)"


def describe_load(plan: Plan) -> list[str]:
    a = ", ".join(f"{plan.accept_messages[s]} at {report.size_label(s)}" for s in plan.sizes)
    lat = ", ".join(f"{plan.latency_messages[s]} at {report.size_label(s)}" for s in plan.sizes)
    b = ", ".join(f"{plan.relay_messages[s]} at {report.size_label(s)}" for s in plan.sizes)
    example = " ".join(Path(x).name if i == 0 else x for i, x in
                       enumerate(smtp_source_command(0, 0, 0, plan.sessions)))
    lines = {
        "A": f"A  sysmail-relay -> local outbox (Maildir). smtp-source: {a} messages; "
             f"latency ('.' sent to 250 read, asyncio client): {lat} messages",
        "B": f"B  smtp-source -> system under test -> smtp-sink. {b} messages; end-to-end "
             "= first connect until the sink counted all; CPU = the whole process tree "
             f"until its queue is empty; then latency on the same instance: {lat} messages. "
             "sysmail-relay: its default (listener.workers = \"auto\"); workers=1: one "
             "process",
        "L": library.describe(plan.relay_messages),
        "S": scaling.describe(plan.scaling_messages),
        "M": footprint.describe(plan.footprint),
        **tls.describe(plan.scenarios, plan.tls_messages),
        "TS": tls_scaling.describe(plan.tls_scaling_messages),
    }
    described = [
        f"load: {plan.sessions} concurrent client sessions, one message per connection "
        f"({example.replace(':0', ':PORT')} with -m N -l SIZE)",
        *(line for scenario, line in lines.items() if scenario in plan.scenarios),
    ]
    if set(plan.scenarios) != {"M"}:  # M measures once: no medians
        described.append("cells: median (min-max) over rounds; "
                         "ratio = relay median / postfix median")
    return described


def render(plan: Plan, meta: dict[str, Any], rows: list[report.Row],
           measurements: list[Measurement]) -> str:
    lines = [
        f"sysmail-relay benchmark {meta['started']}  ({plan.rounds} round(s), "
        f"{'quick' if meta['quick'] else 'full'}, took {meta['duration_s']:.0f} s"
        f"{', INTERRUPTED' if meta['interrupted'] else ''})",
        f"machine: {machine.summary_line(meta['machine'])}",
        *describe_load(plan),
    ]
    if rows:
        lines += ["", report.table(rows)]
    lines.append(_background_line(measurements))
    for section in (footprint.section(measurements), scaling.section(measurements),
                    tls_scaling.section(measurements)):
        if section:
            lines += ["", *section]
    notes = _notes(measurements)
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines) + "\n"


def _background_line(measurements: list[Measurement]) -> str:
    values = [float(m.extra["background_cores"]) for m in measurements
              if "background_cores" in m.extra]
    if not values:
        return ""
    line = (f"\nbackground: other processes on the machine used a median of "
            f"{statistics.median(values):.2f} and at most {max(values):.2f} cores during the "
            "measurements (0 = the machine was ours alone)")
    if max(values) > BUSY_MACHINE:
        line += "\nWARNING: the machine was busy with other work during some measurements; " \
                "their figures are disturbed (background_cores per measurement in the JSON)"
    return line


def _notes(measurements: list[Measurement]) -> list[str]:
    seen: set[str] = set()
    notes: list[str] = []
    versions = sorted({str(m.extra["relay_code"]) for m in measurements if "relay_code" in m.extra})
    if len(versions) > 1:
        notes.append(f"- relay/ changed while this ran: {len(versions)} versions of the code "
                     f"were measured ({', '.join(versions)}; see relay_code per measurement "
                     "in the JSON); compare rounds with care")
    for m in measurements:
        if m.status == "ok" or not m.detail:
            continue
        what = m.variant or report.size_label(m.size)
        note = f"- {m.scenario} {m.system} {what}: {m.status}: " \
               f"{m.detail.strip().splitlines()[0]}"
        if note not in seen:
            seen.add(note)
            notes.append(note)
    return notes


def write_results(out: Path, stamp: str, document: dict[str, Any], text: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, text_path = out / f"{stamp}.json", out / f"{stamp}.txt"
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    text_path.write_text(text, encoding="utf-8")
    return [json_path, text_path]


def leftovers(work: Path) -> list[str]:
    """Anything still running that this run started: it should be nothing."""
    mine = process_tree(os.getpid())[1:]
    return [f"{st.pid} {st.name}" for st in [*mine, *processes_mentioning(str(work))]]


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="sysmail-bench-"))
    runner = Runner(plan, work, keep=args.keep)
    interrupted = False
    begin = time.monotonic()
    try:
        runner.run()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: everything started has been stopped; writing what was measured")
    finally:
        described = machine.describe(work, ROOT)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta = {"started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
            "duration_s": time.monotonic() - begin, "interrupted": interrupted,
            "machine": described, "argv": list(argv), "work_dir": str(work)}
    publish(args.out, started.strftime("%Y%m%dT%H%M%SZ"), plan, meta, runner)
    if args.keep:
        print(f"kept {work} (configurations, logs, queues)")
    left = leftovers(work)
    if left:
        print(f"WARNING: still running after the benchmark: {', '.join(left)}")
    return 130 if interrupted else 0


def publish(out: Path, stamp: str, plan: Plan, meta: dict[str, Any], runner: Runner) -> None:
    """Print the table and write <stamp>.txt and <stamp>.json."""
    rows = report.summarize(runner.measurements, plan.sizes)
    text = render(plan, meta, rows, runner.measurements)
    print()
    print(text, end="")
    document = {**meta, "plan": asdict(plan), "load": describe_load(plan),
                "relay_b_unavailable": runner.relay_unavailable,
                "summary": [row.as_dict() for row in rows],
                "footprint": footprint.summary(runner.measurements),
                "scaling": scaling.summary(runner.measurements),
                "tls_scaling": tls_scaling.summary(runner.measurements),
                "oauth_tokens": tls.summary(runner.measurements),
                "measurements": [asdict(m) for m in runner.measurements]}
    for path in write_results(out, stamp, document, text):
        print(f"wrote {path}")
