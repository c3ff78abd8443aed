"""The retry policy, pure: what one attempt's replies mean for an entry.

No I/O and no clock (the caller passes `now`): the scheduler does the disk, the
metrics and the log. 4xx, timeouts, connection and authentication failures defer
a recipient with exponential backoff (`queue.retry_initial` doubling up to
`queue.retry_max`, 10 % jitter); a 5xx fails it; once no recipient is pending the
entry is done, or a dead letter when one failed; a message older than
`queue.max_age` becomes a dead letter with the last reply as its reason. Held on
purpose (rate limit, not granted, inactive) is not an attempt and waits until the
time the hold names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from relay.errors import Held, PermanentFailure, TemporaryFailure
from relay.settings import QueueSettings
from relay.spool import Envelope, Recipient
from relay.upstream.base import Outcome


@dataclass
class Settled:
    """An attempt's verdict; the envelope has been updated to match."""

    verdict: Literal["done", "dead", "deferred"]
    results: list[tuple[Recipient, Outcome, str]] = field(default_factory=list)
    """Each recipient that was pending, its outcome and its result: ok, failed or deferred."""
    deferred: list[Outcome] = field(default_factory=list)
    attempted: bool = True
    """False when every outcome was a hold (rate limit, not granted): not an attempt."""


def settle(env: Envelope, outcomes: list[Outcome], now: float,
           queue: QueueSettings) -> Settled:
    """Apply one attempt's outcomes to `env`: recipient states and replies, attempts,
    last reply, and the dead reason or the next attempt."""
    env.crashes = 0  # the attempt came back: max_crashes counts interruptions in a row
    settled = Settled("deferred")
    settled.attempted = not outcomes or not all(isinstance(o.failure, Held) for o in outcomes)
    if settled.attempted:
        env.attempts += 1  # held on purpose (rate limit, not granted) is not an attempt
    by_address = {o.recipient: o for o in outcomes}
    for rcpt in env.pending:
        outcome = by_address.get(rcpt.address)
        if outcome is None:
            outcome = Outcome(rcpt.address, "no answer for this recipient",
                              TemporaryFailure("no answer for this recipient"))
        rcpt.reply = outcome.reply
        if outcome.failure is None:
            rcpt.state = "delivered"
            result = "ok"
        elif isinstance(outcome.failure, PermanentFailure):
            rcpt.state = "failed"
            result = "failed"
        else:
            settled.deferred.append(outcome)
            result = "deferred"
        settled.results.append((rcpt, outcome, result))
    env.last_reply = (settled.deferred or outcomes or [Outcome("", "")])[0].reply
    if not env.pending:
        failed = [r for r in env.recipients if r.state == "failed"]
        if failed:
            env.dead_reason = "; ".join(f"<{r.address}>: {r.reply}" for r in failed)
        settled.verdict = "dead" if failed else "done"
        return settled
    if now - env.age_base > queue.max_age:
        env.dead_reason = (f"not delivered within queue.max_age ({queue.max_age:.0f} s); "
                           f"last reply: {env.last_reply}")
        settled.verdict = "dead"
        return settled
    waits = [o.failure.retry_at for o in settled.deferred
             if isinstance(o.failure, Held) and o.failure.retry_at]
    if waits and len(waits) == len(settled.deferred):  # held on purpose: not an attempt
        env.next_attempt = max(waits)
    else:
        env.next_attempt = now + backoff(queue, max(1, env.attempts))
    return settled


def backoff(queue: QueueSettings, attempts: int) -> float:
    """retry_initial doubling with each attempt up to retry_max, with 10 % jitter."""
    delay: float = min(queue.retry_max, queue.retry_initial * 2.0 ** min(attempts - 1, 30))
    return delay * random.uniform(0.9, 1.1)
