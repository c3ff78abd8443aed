"""CPU time of a process tree and the memory of a process, read from /proc.

A process's CPU is `utime + stime`; when a child exits and its parent reaps it,
the child's time moves into the parent's `cutime + cstime`. Summing all four
over a root and its live descendants therefore gives a total that only grows,
even while Postfix's master starts and retires smtpd, cleanup and smtp processes
during a run. Zombies still carry their own times and are counted until reaped.

`utime + stime` are counted from the timer's ticks, and on this kind of machine they
miss much of the time of a process that runs in short bursts between waits: for
Postfix's null client relaying 1,000 messages of 100 KiB, its processes' ticks gave
2.0 s where the scheduler's own count (`/proc/PID/task/TID/schedstat`, in
nanoseconds) gave 2.75 s, and the machine's busy time (`/proc/stat`, itself counted
in ticks) was nearer the latter; for the relay's few busy processes the two agree.
The scheduler's count covers only the threads alive now (a thread that ended is
missing), the ticks cover all of them: each is a lower bound, so a live process counts
with the larger.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    name: str
    ticks_self: int
    """utime + stime"""
    ticks_children: int
    """cutime + cstime: reaped children"""
    started: int
    """start time in ticks after boot: with pid, names one process even if pids are reused"""


def read_stat(pid: int) -> ProcStat | None:
    """One process's /proc/PID/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return ProcStat(pid, int(fields[1]), name, utime + stime, cutime + cstime, int(fields[19]))


def all_processes() -> list[ProcStat]:
    found: list[ProcStat] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := read_stat(int(entry.name))) is not None:
            found.append(st)
    return found


def process_tree(root: int) -> list[ProcStat]:
    """*root* and all its descendants (empty when *root* is gone)."""
    procs = all_processes()
    by_parent: dict[int, list[ProcStat]] = {}
    for st in procs:
        by_parent.setdefault(st.ppid, []).append(st)
    tree = [st for st in procs if st.pid == root]
    todo = list(tree)
    while todo:
        children = by_parent.get(todo.pop().pid, [])
        tree.extend(children)
        todo.extend(children)
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by *root*, its live descendants and every reaped child."""
    return sum(max(st.ticks_self / _TICKS_PER_SECOND, runtime_seconds(st.pid))
               + st.ticks_children / _TICKS_PER_SECOND for st in process_tree(root))


def runtime_seconds(pid: int) -> float:
    """The time the live threads of *pid* have run, as the scheduler counts it (the first
    field of each `/proc/PID/task/TID/schedstat`, nanoseconds); 0.0 when it is gone or
    the kernel does not say."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return total / 1e9


def tree_names(root: int) -> dict[str, int]:
    """How many processes of each name the tree holds (for the record)."""
    counts: dict[str, int] = {}
    for st in process_tree(root):
        counts[st.name] = counts.get(st.name, 0) + 1
    return counts


def processes_mentioning(text: str) -> list[ProcStat]:
    """Processes whose command line or MAIL_CONFIG mentions *text* (leftover check)."""
    found: list[ProcStat] = []
    for st in all_processes():
        if st.pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{st.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{st.pid}/environ").read_bytes()
        except OSError:
            continue
        mail_config = [v for v in environ.split(b"\0") if v.startswith(b"MAIL_CONFIG=")]
        if text.encode() in cmdline or any(text.encode() in v for v in mail_config):
            found.append(st)
    return found


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, interrupts) CPU seconds of all cores since boot, from /proc/stat.

    busy = user + nice + system + irq + softirq + steal; interrupts = irq +
    softirq, which no process is charged for (loopback TCP is softirq work).
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    busy = user + nice + system + irq + softirq + steal
    return busy / _TICKS_PER_SECOND, (irq + softirq) / _TICKS_PER_SECOND


def own_cpu_seconds() -> float:
    """This process and its reaped children (smtp-source runs end before it is read)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def kernel_threads() -> dict[tuple[int, int], int]:
    """CPU ticks of each kernel thread (children of kthreadd): writeback, journal, ...

    Their work is charged to no process, so it is in no system's figure; the
    disk I/O of a queue shows up here. Compare two snapshots with
    `kernel_threads_cpu_seconds`.
    """
    return {(st.pid, st.started): st.ticks_self
            for st in all_processes() if st.pid == 2 or st.ppid == 2}


def kernel_threads_cpu_seconds(before: dict[tuple[int, int], int],
                               after: dict[tuple[int, int], int]) -> float:
    """CPU the kernel threads used between two snapshots (threads that exited in
    between are missed; threads that started count in full)."""
    ticks = sum(t - before.get(key, 0) for key, t in after.items())
    return max(ticks, 0) / _TICKS_PER_SECOND


def memory_kib(pid: int) -> dict[str, int]:
    """The Vm* lines of /proc/PID/status in KiB: VmRSS (resident now), VmHWM (its peak), ...

    Raises FileNotFoundError when the process is gone.
    """
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            found[key] = int(value.split()[0])
    return found


def reset_peak_memory(pid: int) -> None:
    """Set VmHWM back to the current VmRSS (writing 5 to clear_refs, Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
