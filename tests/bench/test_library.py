"""bench/ scenario L: aiosmtplib alone into a real smtp-sink and through T's upstream (a
real Postfix wanting STARTTLS and AUTH PLAIN through Dovecot), aiosmtpd alone under
smtp-source; set beside Postfix's B and T figures."""

from __future__ import annotations

from pathlib import Path

from bench import library, report
from bench.scenarios import POSTFIX, RELAY, Measurement


def test_delivery_alone_reaches_both_upstreams_and_intake_alone_is_measured_at_1_kib(
        tmp_path: Path) -> None:
    result = library.measure(tmp_path, 1024, 40, 1, pool_size=2, sessions=4)

    assert result.status == "ok" and result.scenario == "L"
    assert set(result.figures) == {"end_to_end_per_s", "cpu_ms_per_msg", "tls_per_s",
                                   "tls_cpu_ms_per_msg", "accepted_per_s",
                                   "intake_cpu_ms_per_msg", "libraries_cpu_ms_per_msg"}
    assert all(value > 0 for value in result.figures.values())
    assert result.figures["libraries_cpu_ms_per_msg"] == \
        result.figures["cpu_ms_per_msg"] + result.figures["intake_cpu_ms_per_msg"]
    assert result.extra["pool_size"] == 2


def test_at_100_kib_only_delivery_is_measured(tmp_path: Path) -> None:
    result = library.measure(tmp_path, 100 * 1024, 20, 1, pool_size=2, sessions=4)

    assert set(result.figures) == {"end_to_end_per_s", "cpu_ms_per_msg", "tls_per_s",
                                   "tls_cpu_ms_per_msg"}


def test_the_message_has_the_size_asked_and_whole_lines() -> None:
    for size in (1024, 100 * 1024):
        data = library.message(size)
        assert size - len(library.LINE) < len(data) <= size
        assert data.endswith(b"\r\n") and b"\n." not in data


def test_rows_compare_the_library_with_postfix_in_scenario_b() -> None:
    def run(scenario: str, system: str, size: int, **figures: float) -> Measurement:
        return Measurement(scenario, system, size, 1, 100,  # type: ignore[arg-type]
                           figures=figures)

    postfix = {"end_to_end_per_s": 400.0, "cpu_ms_per_msg": 2.0, "accepted_per_s": 500.0}
    hop = {"end_to_end_per_s": 200.0, "cpu_ms_per_msg": 4.0}
    rows = report.summarize([
        run("B", POSTFIX, 1024, **postfix), run("B", POSTFIX, 102400, **postfix),
        run("T", POSTFIX, 1024, **hop),
        run("L", RELAY, 1024, end_to_end_per_s=1200, cpu_ms_per_msg=0.5, accepted_per_s=250,
            intake_cpu_ms_per_msg=1.0, libraries_cpu_ms_per_msg=1.5, tls_per_s=300,
            tls_cpu_ms_per_msg=1.0),
        run("L", RELAY, 102400, end_to_end_per_s=300, cpu_ms_per_msg=1.5)], [1024, 102400])
    ratios = {(row.figure.key, row.size): row.ratio for row in rows
              if row.figure.scenario == "L"}

    assert ratios == {("end_to_end_per_s", 1024): 3.0, ("end_to_end_per_s", 102400): 0.75,
                      ("cpu_ms_per_msg", 1024): 0.25, ("cpu_ms_per_msg", 102400): 0.75,
                      ("accepted_per_s", 1024): 0.5, ("intake_cpu_ms_per_msg", 1024): 0.5,
                      ("libraries_cpu_ms_per_msg", 1024): 0.75, ("tls_per_s", 1024): 1.5,
                      ("tls_cpu_ms_per_msg", 1024): 0.25}


def test_no_library_rows_without_scenario_l() -> None:
    only_b = [Measurement("B", POSTFIX, 1024, 1, 100, figures={"end_to_end_per_s": 400})]

    assert all(row.figure.scenario == "B" for row in report.summarize(only_b, [1024]))
