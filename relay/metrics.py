"""Prometheus metrics (DESIGN.md, "Metrics"): one registry per relay, no globals.

Every labelled series the configuration makes possible is exported at 0 from the first
scrape (`Metrics.declare`, at start and after each reload), so that an `increase()` or
`rate()` alert sees the first event: a series that appears at 1 has no earlier sample
to increase from, and Prometheus reports no increase.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REJECT_REASONS = ("network", "connections", "size", "recipients", "line_length", "spool")
"""Every `reason` of relay_messages_rejected_total (relay.listener)."""
DELIVERY_RESULTS = ("ok", "deferred", "failed")
POP_RESULTS = ("ok", "failed")
OAUTH_RESULTS = ("ok", "invalid_grant", "unreachable", "error")
"""Every `result` of relay_oauth_refresh_total (relay.oauth)."""


class IntakeMetrics:
    """What the listener updates. With intake workers (relay.listener.workers) each
    worker has its own, in prometheus-client's multiprocess mode, and the parent's
    /metrics sums them (`intake_collector`); the gauge counts live workers only."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.messages_received = Counter(
            "relay_messages_received", "Messages accepted by the listener (250 sent)",
            registry=r)
        self.messages_rejected = Counter(
            "relay_messages_rejected", "Messages or sessions refused by the listener",
            ["reason"], registry=r)
        self.smtp_sessions = Gauge(
            "relay_smtp_sessions", "Client SMTP sessions open on the listener", registry=r,
            multiprocess_mode="livesum")
        for reason in REJECT_REASONS:
            self.messages_rejected.labels(reason)


def intake_collector(path: str) -> Collector:
    """The workers' intake metrics, summed from the files in `path`, with their help."""
    from prometheus_client.multiprocess import MultiProcessCollector
    helps = {m._name: m._documentation for m in vars(IntakeMetrics()).values()
             if isinstance(m, Counter | Gauge)}

    class Intake(Collector):
        def collect(self) -> Iterable[Metric]:
            collector = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
            for family in collector.collect():  # type: ignore[no-untyped-call]
                family.documentation = helps.get(family.name, family.documentation)
                yield family

    return Intake()


class Metrics:
    """Every metric named in the design, with exactly those names and labels.

    `intake` False: the listener's metrics are kept out of this registry, because
    the intake workers' (added with `intake_collector`) stand for them."""

    def __init__(self, registry: CollectorRegistry | None = None, intake: bool = True) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "relay_"
        self.intake = IntakeMetrics(r if intake else None)
        self.messages_received = self.intake.messages_received
        self.messages_rejected = self.intake.messages_rejected
        self.smtp_sessions = self.intake.smtp_sessions
        self.deliveries = Counter(
            p + "deliveries", "Delivery attempts per recipient, by result (ok, deferred, failed)",
            ["server", "result"], registry=r)
        self.delivery_seconds = Histogram(
            p + "delivery_seconds", "Time to hand one message to the upstream",
            ["server"], buckets=_DELIVERY_BUCKETS, registry=r)
        self.queue_messages = Gauge(
            p + "queue_messages", "Messages in the spool by state (queued, deferred, held, dead)",
            ["state"], registry=r)
        self.queue_oldest_seconds = Gauge(
            p + "queue_oldest_seconds", "Age of the oldest message waiting for delivery",
            registry=r)
        self.upstream_sessions = Gauge(
            p + "upstream_sessions", "Open sessions to the upstream server", ["server"],
            registry=r)
        self.upstream_up = Gauge(
            p + "upstream_up", "1 when the server took the last attempt, 0 when it failed, "
            "refused the login (paused) or OAuth is not granted", ["server"], registry=r)
        self.auth_failures = Counter(
            p + "auth_failures", "Upstream authentication failures", ["server", "method"],
            registry=r)
        self.pop_before_smtp = Counter(
            p + "pop_before_smtp", "POP-before-SMTP logins by result", ["server", "result"],
            registry=r)
        self.oauth_token_expiry = Gauge(
            p + "oauth_token_expiry_timestamp_seconds", "When the stored access token expires",
            ["client"], registry=r)
        self.oauth_credential_expiry = Gauge(
            p + "oauth_credential_expiry_timestamp_seconds",
            "When the client certificate of an OAuth client expires", ["client"], registry=r)
        self.oauth_refresh = Counter(
            p + "oauth_refresh", "OAuth token refreshes by result", ["client", "result"],
            registry=r)
        self.config_reloads = Counter(
            p + "config_reloads", "Configuration reloads (SIGHUP) by result", ["result"],
            registry=r)
        for state in ("queued", "deferred", "held", "dead"):
            self.queue_messages.labels(state)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)

    def declare(self, servers: Iterable[tuple[str, str | None, bool]],
                clients: Iterable[str]) -> None:
        """Export at 0 every labelled counter series the configuration makes possible
        (rejections by reason are there from the start, with the intake metrics): per
        server (each configured one and the built-in outbox when it sends) deliveries by
        result, its login's authentication failures, POP-before-SMTP logins by result;
        OAuth token requests per client by result. Series of servers or clients a reload
        removed stay (a counter never goes back)."""
        for name, login, pop_before_smtp in sorted(servers):
            for result in DELIVERY_RESULTS:
                self.deliveries.labels(name, result)
            if login is not None:
                self.auth_failures.labels(name, login)
            if pop_before_smtp:
                for result in POP_RESULTS:
                    self.pop_before_smtp.labels(name, result)
        for client in clients:
            for result in OAUTH_RESULTS:
                self.oauth_refresh.labels(client, result)
