"""Metrics from the first scrape, and the alert rules tested on them with promtool.

A real relay (the installed `sysmail-relay serve`, a TOML file with a password server,
a POP-before-SMTP server and an OAuth one) is scraped at start and after a SIGHUP that
adds a server: every labelled counter series the configuration makes possible is there
at 0, so that `increase()` alerts fire on the first event; a client certificate's
expiry is there as soon as the configuration names it. deploy/prometheus-alerts.yml
is checked and unit-tested with Debian's `promtool` (.ci/install-peers.sh installs it),
and every series those unit tests feed in is one that relay really exports (a fleet's
series: one a relay in a fleet exports, in tests/fleet/test_fleet_admin.py).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import DELIVERY_RESULTS, OAUTH_RESULTS, POP_RESULTS, REJECT_REASONS
from tests.oauth_jwt import Certificate
from tests.support import Daemon, free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus-alerts.test.yml"
SCRAPE_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series; the relay does not export them."""

Series = tuple[str, frozenset[tuple[str, str]]]

CONFIG = """
state_dir = "{state}"
[listener]
port = {port}
[admin]
port = {admin}
[system_account]
address = "notify@example.com"
server = "smarthost"
[servers.smarthost]
host = "127.0.0.1"
port = {upstream}
encryption = "none"
auth = {{ method = "PLAIN", username = "sys", password = "not-used-here" }}
[servers.popserver]
host = "127.0.0.1"
port = {upstream}
[servers.popserver.pop_before_smtp]
host = "127.0.0.1"
port = {upstream}
apop = true
username = "u"
password = "not-used-here"
[servers.gmail]
oauth = {{ client = "google" }}
[oauth_clients.google]
provider = "google"
client_id = "relay.apps.googleusercontent.com"
client_secret = "not-used-here"
{extra}"""

ADDED_SERVER = """
[servers.backup]
host = "127.0.0.1"
port = {upstream}
encryption = "tls"
auth = {{ method = "CRAM-MD5", username = "sys", password = "not-used-here" }}
"""


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, ("promtool is missing: run .ci/install-peers.sh as root (it installs "
                   "Debian's prometheus package, which ships promtool)")
    return found


class Relay:
    """The daemon with its config file and admin port."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port, self.admin, self.upstream = free_port(), free_port(), free_port()
        self.config = tmp_path / "relay.toml"
        self.write()
        self.daemon = Daemon(self.config, tmp_path / "relay.log", self.port)

    def write(self, extra: str = "") -> None:
        self.config.write_text(CONFIG.format(
            state=self.tmp_path / "state", port=self.port, admin=self.admin,
            upstream=self.upstream, extra=extra.format(upstream=self.upstream)))

    def start(self) -> None:
        """Serve, and wait for the admin listener (bound just after the SMTP one)."""
        self.daemon.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.admin), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, self.daemon.log_text()
                time.sleep(0.05)

    def scrape(self) -> dict[Series, float]:
        """Every sample of /metrics but the `_created` timestamps."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as r:
            return exported_series(r.read().decode())


def exported_series(text: str) -> dict[Series, float]:
    """Every sample of a /metrics text but the `_created` timestamps."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if not s.name.endswith("_created")}


@pytest.fixture
def relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Relay]:
    started = Relay(tmp_path)
    monkeypatch.setenv("RELAY_ADMIN__PORT", str(started.admin))  # the environment wins
    try:
        started.start()
        yield started
    finally:
        if started.daemon.proc is not None:
            assert started.daemon.stop() == 0, started.daemon.log_text()


def series(name: str, **labels: str) -> Series:
    return name, frozenset(labels.items())


def expected_at_start(server: str, method: str | None = None, pop: bool = False) -> set[Series]:
    found = {series("relay_deliveries_total", server=server, result=r) for r in DELIVERY_RESULTS}
    if method is not None:
        found.add(series("relay_auth_failures_total", server=server, method=method))
    if pop:
        found |= {series("relay_pop_before_smtp_total", server=server, result=r)
                  for r in POP_RESULTS}
    return found


def test_every_labelled_counter_is_exported_at_zero_from_the_first_scrape(
        relay: Relay) -> None:
    scraped = relay.scrape()
    wanted = (expected_at_start("smarthost", "PLAIN")
              | expected_at_start("popserver", "POP", pop=True)
              | expected_at_start("gmail", "XOAUTH2")
              | {series("relay_messages_rejected_total", reason=r) for r in REJECT_REASONS}
              | {series("relay_oauth_refresh_total", client="google", result=r)
                 for r in OAUTH_RESULTS}
              # not signed in: 0, which SysmailRelayOAuthNotGranted alerts on
              | {series("relay_oauth_token_expiry_timestamp_seconds", client="google")})
    missing = wanted - set(scraped)
    assert not missing, sorted(missing)
    assert {s: scraped[s] for s in wanted} == dict.fromkeys(wanted, 0.0)
    # nothing invented: no login method a server does not use, no POP series without POP
    assert {s for s in scraped if s[0] == "relay_auth_failures_total"} == {
        s for s in wanted if s[0] == "relay_auth_failures_total"}
    assert {s for s in scraped if s[0] == "relay_pop_before_smtp_total"} == {
        s for s in wanted if s[0] == "relay_pop_before_smtp_total"}


def test_a_server_added_by_a_reload_is_exported_at_zero_at_once(relay: Relay) -> None:
    assert not expected_at_start("backup", "CRAM-MD5") & set(relay.scrape())
    relay.write(ADDED_SERVER)
    relay.daemon.send_signal(signal.SIGHUP)
    reloaded = series("relay_config_reloads_total", result="ok")
    deadline = time.monotonic() + 20
    while (scraped := relay.scrape()).get(reloaded) != 1.0:
        assert time.monotonic() < deadline, relay.daemon.log_text()
        time.sleep(0.05)
    wanted = expected_at_start("backup", "CRAM-MD5")
    assert {s: scraped.get(s) for s in wanted} == dict.fromkeys(wanted, 0.0)


def reload_with(relay: Relay, extra: str) -> dict[Series, float]:
    """Write extra into the config, SIGHUP, and scrape once the reload is counted."""
    relay.write(extra)
    relay.daemon.send_signal(signal.SIGHUP)
    reloaded = series("relay_config_reloads_total", result="ok")
    deadline = time.monotonic() + 20
    while (scraped := relay.scrape()).get(reloaded) != 1.0:
        assert time.monotonic() < deadline, relay.daemon.log_text()
        time.sleep(0.05)
    return scraped


def certificate_client(tmp_path: Path) -> tuple[Certificate, str]:
    """A certificate and the [oauth_clients.exchange] that signs in with it."""
    cert = Certificate.make(days=90)
    cert_file, key_file = cert.write(tmp_path / "pki")
    return cert, (f'[oauth_clients.exchange]\nprovider = "microsoft"\nclient_id = "app-id"\n'
                  f'grant = "client_credentials"\nclient_certificate_file = "{cert_file}"\n'
                  f'client_key_file = "{key_file}"\n')


def test_a_client_certificate_added_by_a_reload_exports_when_it_expires(
        relay: Relay, tmp_path: Path) -> None:
    cert, client = certificate_client(tmp_path)
    gauge = series("relay_oauth_credential_expiry_timestamp_seconds", client="exchange")
    assert gauge not in relay.scrape()  # no certificate, no series (a secret has no expiry)
    scraped = reload_with(relay, client)
    assert scraped[gauge] == cert.cert.not_valid_after_utc.timestamp()


def test_promtool_accepts_the_alert_rules() -> None:
    run = subprocess.run([promtool(), "check", "rules", str(RULES)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    run = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M))
    tests = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels", tests))
    quiet = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts: \[\]", tests))
    assert len(alerts) >= 12
    assert firing == alerts  # each fires on the relay's series ...
    assert quiet == alerts  # ... and is silent before its condition holds


def alert_test_series() -> set[Series]:
    """What the promtool unit tests feed in, without the labels the scrape adds and with
    every OAuth client called "*" (the tests' clients stand for any [oauth_clients])."""
    fed: set[Series] = set()
    for name, labels in re.findall(r"- series: '(\w+)\{([^}]*)\}'", RULE_TESTS.read_text()):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert set(pairs) >= SCRAPE_LABELS, (name, pairs)
        if name != "up":  # Prometheus's own series for the scrape
            fed.add(series(name, **{k: v for k, v in pairs.items() if k not in SCRAPE_LABELS}))
    return any_client(fed)


def any_client(found: Iterable[Series]) -> set[Series]:
    return {(name, frozenset((k, "*" if k == "client" else v) for k, v in labels))
            for name, labels in found}


FLEET_ONLY = "relay_fleet_"
"""Series of a relay in a fleet: tests/fleet/test_fleet_admin.py checks those."""


def test_the_alert_tests_feed_only_series_the_relay_exports(relay: Relay,
                                                             tmp_path: Path) -> None:
    fed = alert_test_series()
    assert len(fed) > 15
    exported = any_client(reload_with(relay, certificate_client(tmp_path)[1]))
    assert {s for s in fed if not s[0].startswith(FLEET_ONLY)} - exported == set()


def test_reasons_and_results_in_the_code_and_the_docs_are_the_ones_declared() -> None:
    code = "\n".join(p.read_text() for p in (ROOT / "relay").rglob("*.py"))
    counted = re.findall(r'(?:messages_rejected\.labels|\.rejected)\("(\w+)"\)', code)
    assert set(counted) == set(REJECT_REASONS)
    oauth = (ROOT / "relay" / "oauth" / "manager.py").read_text()
    counted = oauth[oauth.index("async def _counted"):]
    assert set(re.findall(r'"(\w+)"', counted)) >= set(OAUTH_RESULTS)
    docs = (ROOT / "docs" / "metrics.md").read_text()
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `(relay_\w+)` \|[^|]*\|[^|]*\| (.*) \|$",
                                             docs, re.M)}
    for metric, values in [("relay_messages_rejected_total", REJECT_REASONS),
                           ("relay_deliveries_total", DELIVERY_RESULTS),
                           ("relay_pop_before_smtp_total", POP_RESULTS),
                           ("relay_oauth_refresh_total", OAUTH_RESULTS)]:
        for value in values:
            assert f"`{value}`" in rows[metric], (metric, value)
