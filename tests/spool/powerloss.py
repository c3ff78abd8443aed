"""What the power-cut tests share: how many cuts, their seeds, and the spool's checks.

`TEST_POWERCUTS` sets how many cuts the power-loss tests make in all (20 by default,
the form CI runs; 100 or more for the full one, docs/reliability.md), split between
the spool (three in four) and the installed daemon (one in four).
`TEST_POWERCUT_SEED` replays a run: each test prints the seed it used.
`TEST_POWERCUT_SPLIT_RENAMES=1` runs them on a PowerFS whose renames become durable
by halves (tests/spool/powerfs.py), as where renames are not atomic across a crash:
there, a power cut between a claim's rename and its fsync of active/, after another
process fsynced queue/, can still lose an entry (docs/reliability.md, section 8).
(Not RELAY_*: those are the relay's settings, which the tests clear.)
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import DamagedEntry
from relay.spool import Envelope, Spool, recover

CUTS = int(os.environ.get("TEST_POWERCUTS", "20"))
DAEMON_CUTS = max(CUTS // 4, 1)
SPOOL_CUTS = max(CUTS - DAEMON_CUTS, 1)
SPLIT_RENAMES = os.environ.get("TEST_POWERCUT_SPLIT_RENAMES") == "1"


def seed(name: str) -> int:
    """The run's seed (TEST_POWERCUT_SEED, else a new one), printed for a replay."""
    value = int(os.environ.get("TEST_POWERCUT_SEED") or random.randrange(1 << 32))
    print(f"{name}: TEST_POWERCUT_SEED={value} TEST_POWERCUTS={CUTS}"
          + (" TEST_POWERCUT_SPLIT_RENAMES=1" if SPLIT_RENAMES else ""))
    return value


@dataclass
class Sent:
    """What the clients were told: what got 250, and what the test then delivered."""

    acked: dict[str, tuple[Envelope, bytes]] = field(default_factory=dict)
    delivered: set[str] = field(default_factory=set)
    """Finished (taken by the upstream): may be gone after a cut, or there again."""


def check_spool(root: Path, sent: Sent, max_crashes: int = 100) -> list[str]:
    """Start the spool at `root` as the daemon does (open, recover) and say what is
    wrong: a message that got 250 missing, or not whole, or any entry quarantined or
    unreadable (half-written). Empty when all is well."""
    spool = Spool(root)
    spool.open()
    report = recover(spool, max_crashes)
    problems = [f"{qid}: quarantined at start-up: {why}" for qid, why in report.quarantined]
    quarantine = root / "quarantine"
    problems += [f"{name}: in quarantine/" for name in sorted(os.listdir(quarantine))]
    for place in ("queue", "dead"):
        for qid, env in spool.scan(place):  # type: ignore[arg-type]
            if isinstance(env, DamagedEntry):
                problems.append(f"{qid}: half-written in {place}/: {env}")
    for qid, (envelope, body) in sorted(sent.acked.items()):
        try:
            found = spool.find(qid)
        except DamagedEntry as e:
            problems.append(f"{qid}: got 250, half-written: {e}")
            continue
        if found is None:
            if qid not in sent.delivered:
                problems.append(f"{qid}: got 250, then lost")
            continue
        place, env = found
        if place != "queue":
            problems.append(f"{qid}: got 250, found in {place}/ after start-up")
        if spool.read_message(qid, place) != body:
            problems.append(f"{qid}: got 250, message not whole")
        if [r.address for r in env.recipients] != [r.address for r in envelope.recipients]:
            problems.append(f"{qid}: got 250, recipients changed")
    return problems
