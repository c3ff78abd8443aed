"""Prometheus metrics (DESIGN.md, "Metrics"): one registry per relay, no globals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric named in the design, with exactly those names and labels."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "relay_"
        self.messages_received = Counter(
            p + "messages_received", "Messages accepted by the listener (250 sent)", registry=r)
        self.messages_rejected = Counter(
            p + "messages_rejected", "Messages or sessions refused by the listener",
            ["reason"], registry=r)
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
        self.oauth_refresh = Counter(
            p + "oauth_refresh", "OAuth token refreshes by result", ["client", "result"],
            registry=r)
        self.smtp_sessions = Gauge(
            p + "smtp_sessions", "Client SMTP sessions open on the listener", registry=r)
        self.config_reloads = Counter(
            p + "config_reloads", "Configuration reloads (SIGHUP) by result", ["result"],
            registry=r)
        for state in ("queued", "deferred", "held", "dead"):
            self.queue_messages.labels(state)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
