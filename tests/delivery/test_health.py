"""relay.health: which server states hold the mail, and when the upstream counts as up."""

from __future__ import annotations

from relay.delivery.health import HELD_STATES, ServerHealth, describe, state_label
from relay.errors import AuthenticationFailure, Held, TemporaryFailure, UpstreamUnreachable

NOW = 1_800_000_000.0


def test_a_refused_login_followed_by_a_pause_holds_the_mail_until_the_pause_ends() -> None:
    health = ServerHealth("system")
    health.failed(AuthenticationFailure("535 5.7.8 bad credentials"), NOW)
    assert health.state(active=True, paused_until=NOW + 60, now=NOW) == "paused"
    assert "paused" in HELD_STATES
    assert health.state(active=True, paused_until=NOW - 1, now=NOW) == "failing"
    assert not health.up(NOW + 60, NOW)


def test_a_rate_limit_pause_is_not_held_and_says_nothing_about_the_server() -> None:
    health = ServerHealth("system")
    health.succeeded(NOW - 5)
    health.failed(Held("rate_limit reached", stage="rate limit", retry_at=NOW + 30), NOW)
    assert health.state(active=True, paused_until=NOW + 30, now=NOW) == "ok"
    assert health.last_error is None and health.up(NOW + 30, NOW)


def test_oauth_not_granted_holds_the_mail_until_an_attempt_gets_through() -> None:
    health = ServerHealth("system")
    health.failed(Held("OAuth authorization Not granted", stage="OAuth token"), NOW)
    assert health.state(active=True, paused_until=0.0, now=NOW) == "not granted"
    health.succeeded(NOW + 1)
    assert health.state(active=True, paused_until=0.0, now=NOW) == "ok"
    assert health.last_error == "OAuth authorization Not granted"  # kept, with its time


def test_an_inactive_account_holds_whatever_the_server_did() -> None:
    health = ServerHealth("system")
    health.failed(UpstreamUnreachable("refused"), NOW)
    assert health.state(active=False, paused_until=0.0, now=NOW) == "inactive"
    assert not health.up(0.0, NOW)  # the upstream's own health: it failed


def test_a_5xx_answer_means_the_server_works() -> None:
    health = ServerHealth("system")
    health.failed(TemporaryFailure("421 busy"), NOW)
    health.answered()
    assert health.state(active=True, paused_until=0.0, now=NOW) == "ok"


def test_the_report_names_the_pause_end_the_error_and_the_next_attempt() -> None:
    health = ServerHealth("system")
    health.failed(AuthenticationFailure("system refused the login: 535"), NOW)
    report = health.report(active=True, paused_until=NOW + 60, now=NOW, next_attempt=NOW + 5)
    assert report["held"] and report["next_attempt"] == NOW + 60
    assert state_label(report).startswith("paused until ")
    lines = describe(report)
    assert lines[0].startswith("  system: paused until ")
    assert "system refused the login: 535" in lines[1] and lines[-1].endswith("never")
