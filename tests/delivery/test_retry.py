"""The retry policy on its own: what one attempt's replies mean, with no disk and no clock."""

from __future__ import annotations

from relay.delivery.retry import backoff, settle
from relay.errors import Held, PermanentFailure, TemporaryFailure
from relay.settings import QueueSettings
from relay.spool import Envelope, Recipient
from relay.upstream.base import Outcome

QUEUE = QueueSettings(max_age="1h", retry_initial="30s", retry_max="15m")
NOW = 1_000_000.0


def envelope(*addresses: str, age: float = 60) -> Envelope:
    return Envelope(id="E", sender="app@example.com",
                    recipients=[Recipient(a) for a in addresses], received_at=NOW - age)


def test_a_mix_of_replies_delivers_fails_and_defers_each_recipient_on_its_own() -> None:
    env = envelope("a@x", "b@x", "c@x")
    settled = settle(env, [Outcome("a@x", "250 ok"),
                           Outcome("b@x", "550 no such user", PermanentFailure("550")),
                           Outcome("c@x", "451 try later", TemporaryFailure("451"))],
                     NOW, QUEUE)
    assert settled.verdict == "deferred"
    assert [r.state for r in env.recipients] == ["delivered", "failed", "pending"]
    assert [result for _, _, result in settled.results] == ["ok", "failed", "deferred"]
    assert env.attempts == 1 and env.last_reply == "451 try later"
    assert NOW + 27 <= env.next_attempt <= NOW + 33  # retry_initial, 10 % jitter


def test_the_last_pending_recipient_settles_the_entry_as_done_or_dead() -> None:
    env = envelope("a@x")
    assert settle(env, [Outcome("a@x", "250 ok")], NOW, QUEUE).verdict == "done"
    env = envelope("a@x", "b@x")
    env.recipients[0].state = "delivered"
    settled = settle(env, [Outcome("b@x", "550 no", PermanentFailure("550"))], NOW, QUEUE)
    assert settled.verdict == "dead" and env.dead_reason == "<b@x>: 550 no"


def test_older_than_max_age_is_a_dead_letter_with_the_last_reply() -> None:
    env = envelope("a@x", age=3601)
    settled = settle(env, [Outcome("a@x", "421 busy", TemporaryFailure("421"))], NOW, QUEUE)
    assert settled.verdict == "dead"
    assert env.dead_reason == "not delivered within queue.max_age (3600 s); last reply: 421 busy"


def test_held_on_purpose_is_not_an_attempt_and_waits_until_the_hold_ends() -> None:
    env = envelope("a@x")
    held = Held("rate limit", retry_at=NOW + 120)
    settled = settle(env, [Outcome("a@x", "held", held)], NOW, QUEUE)
    assert settled.verdict == "deferred" and env.attempts == 0 and env.next_attempt == NOW + 120


def test_a_recipient_without_an_answer_is_deferred() -> None:
    env = envelope("a@x", "b@x")
    settled = settle(env, [Outcome("a@x", "250 ok")], NOW, QUEUE)
    assert settled.verdict == "deferred" and env.recipients[1].reply == \
        "no answer for this recipient"


def test_backoff_doubles_up_to_retry_max() -> None:
    delays = [backoff(QUEUE, n) for n in range(1, 10)]
    assert 27 <= delays[0] <= 33 and 54 <= delays[1] <= 66
    assert all(810 <= d <= 990 for d in delays[5:])
