"""One attempt at one entry: what it takes from the spool, sends, and leaves on record.

`claim` takes the entry (in the delivery thread, relay.delivery.disk) with its bytes
when the message is small and the upstream wants them or they are to be rewritten;
`send` builds the message for the account as it is now (relay.delivery.outgoing) and
hands it to the upstream, turning every failure into per-recipient outcomes (a bug
defers the message, never loses it); `record` applies the pure retry policy
(relay.delivery.retry) and writes down what the attempt said: the log lines, the
relay_deliveries_total and relay_delivery_seconds metrics, the recent results the
admin page shows, the envelope's attempt history and the server's health. What
becomes of the entry then (finished, deferred, dead) is the scheduler's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

from relay.delivery.disk import Result
from relay.delivery.health import ServerHealth
from relay.delivery.outgoing import outgoing
from relay.delivery.retry import Settled, settle
from relay.errors import DeliveryFailure, Held, TemporaryFailure
from relay.metrics import Metrics
from relay.settings import Settings
from relay.spool import INLINE_BYTES, Claimed, Envelope, Spool
from relay.upstream.base import Outcome, Upstream

log = logging.getLogger("relay.delivery")


def claim(spool: Spool, upstream: Upstream, queue_id: str) -> Claimed | None:
    """Take the entry and, when the message is not large and the upstream wants its
    bytes or they are to be rewritten, its bytes (the page cache's work; a large
    message is read as it is sent): one open of the entry, in this thread. The caller
    has the claim made durable (`Spool.sync`, by `disk.ClaimSync`)."""
    taken = spool.take(queue_id, INLINE_BYTES)
    if taken is None or upstream.wants_data or taken.envelope.as_received:
        return taken
    return dataclasses.replace(taken, data=None)  # sent as stored, from the file


async def send(claimed: Claimed, settings: Settings, upstream: Upstream,
               metrics: Metrics) -> list[Outcome]:
    """The upstream's outcome for each pending recipient; never raises but CancelledError."""
    env = claimed.envelope
    pending = env.pending
    started = time.monotonic()
    try:
        message = await outgoing(claimed, settings)
        outcomes = await upstream.deliver(message)
    except DeliveryFailure as failure:
        outcomes = [Outcome(r.address, failure.reply, failure) for r in pending]
    except Exception as e:  # a bug must never lose a message: defer it
        log.exception("%s: delivery raised an unexpected error", env.id)
        bug = TemporaryFailure(f"internal error in the relay: {e!r}")
        outcomes = [Outcome(r.address, bug.reply, bug) for r in pending]
    metrics.delivery_seconds.labels(settings.system_account.server).observe(
        time.monotonic() - started)
    return outcomes


def record(env: Envelope, outcomes: list[Outcome], settings: Settings, metrics: Metrics,
           recent: deque[Result], health: ServerHealth) -> Settled:
    """Apply the outcomes to `env` (relay.delivery.retry) and record them; the verdict."""
    server = settings.system_account.server
    now = time.time()
    settled = settle(env, outcomes, now, settings.queue)
    for rcpt, outcome, result in settled.results:
        if result == "ok":
            log.info("%s: to=<%s> server=%s status=sent (%s)", env.id, rcpt.address, server,
                     outcome.reply)
        elif result == "failed":
            log.warning("%s: to=<%s> server=%s status=failed (%s)", env.id, rcpt.address,
                        server, outcome.reply)
        if not isinstance(outcome.failure, Held):
            metrics.deliveries.labels(server, result).inc()
            recent.append(Result(now, env.id, rcpt.address, result, outcome.reply, env.subject))
    if settled.attempted:  # `queue show` lists the attempts
        env.remember(now, server, {rcpt.address: outcome.reply
                                   for rcpt, outcome, _ in settled.results})
    deferred = settled.deferred
    if any(o.failure is None for o in outcomes):
        health.succeeded(now)
    elif deferred and deferred[0].failure is not None:
        health.failed(deferred[0].failure, now)
    elif outcomes:
        health.answered()
    if settled.verdict == "deferred":
        log.info("%s: server=%s status=deferred attempt=%d retry_in=%.0fs (%s)", env.id,
                 server, env.attempts, env.next_attempt - now, env.last_reply)
    return settled
