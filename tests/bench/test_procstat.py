"""bench.procstat: a process's CPU as the scheduler counts it, not only in ticks."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.procstat import read_stat, runtime_seconds, tree_cpu_seconds

BURN = ("import time, sys\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "sys.stdout.write('burnt\\n'); sys.stdout.flush(); time.sleep(60)\n")


def test_a_live_process_counts_with_the_larger_of_ticks_and_the_schedulers_count() -> None:
    with subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE,
                          text=True) as child:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        stat = read_stat(child.pid)
        assert stat is not None
        ticks = stat.ticks_self / os.sysconf("SC_CLK_TCK")
        runtime = runtime_seconds(child.pid)

        assert runtime >= 0.3  # it burnt 0.3 s of its own CPU time, and the interpreter's start
        assert tree_cpu_seconds(child.pid) >= max(ticks, runtime)
        child.kill()


def test_a_process_that_does_not_exist_has_no_run_time() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1  # no process can have this pid

    assert runtime_seconds(beyond) == 0.0
    assert tree_cpu_seconds(beyond) == 0.0


def test_threads_of_this_process_are_summed() -> None:
    assert runtime_seconds(os.getpid()) > 0.0
