"""The admin listener over real HTTP: metrics, health, status, the page, its forms, access."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import stat
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import cli
from relay.admin.change import dump_toml
from relay.app import Relay
from relay.errors import ConfigError
from relay.fleet import Fleet
from relay.metrics import Metrics
from relay.settings import OVERRIDES_FILE, Settings, load_settings
from tests.support import (
    Daemon,
    RawSMTP,
    RelayFactory,
    ScriptedUpstream,
    free_port,
    listener_port,
    wait_until,
)

MESSAGE = b"From: App <app@example.com>\r\nSubject: Disk alert\r\n\r\nDisk almost full.\r\n.\r\n"
SECRET = "S3cret-Passw0rd"
SLOW_RETRY = {"retry_initial": "1h", "retry_max": "2h"}


def scripted(upstream: ScriptedUpstream) -> Callable[[Any], ScriptedUpstream]:
    return lambda _settings: upstream


class Admin:
    """An HTTP client for one relay's admin listener, keeping cookies like a browser."""

    def __init__(self, relay: Relay, session: aiohttp.ClientSession) -> None:
        assert relay.admin is not None and relay.admin.address is not None
        self.base = f"http://127.0.0.1:{relay.admin.address[1]}"
        self.session = session

    async def get(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        async with self.session.get(self.base + path, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r.headers

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> tuple[int, str, Any]:
        async with self.session.post(self.base + path, data=data, allow_redirects=False,
                                     **kw) as r:
            return r.status, await r.text(), r.headers

    async def csrf(self) -> str:
        _, page, _ = await self.get("/")
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, page
        return found.group(1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def send(relay: Relay, *rcpts: str, body: bytes = MESSAGE) -> str:
    client = await RawSMTP.connect(listener_port(relay))
    await client.cmd("EHLO app.example.com")
    reply = await client.transaction(body, rcpts=rcpts or ("user@example.com",))
    await client.close()
    return reply


def queue_id(reply: str) -> str:
    assert reply.startswith("250"), reply
    return reply.rsplit(" ", 1)[1]


CONFIG = """
state_dir = "{state}"
[listener]
port = 0
workers = 1
max_message_size = 4096
[system_account]
address = "notify@example.com"
server = "system"
[servers.system]
host = "127.0.0.1"
port = 2
encryption = "none"
[servers.system.auth]
method = "PLAIN"
username = "notify"
password = "{secret}"
[queue]
retry_initial = "1h"
retry_max = "2h"
{extra}
"""


@pytest.fixture
async def file_relay(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """A relay started from a TOML file (as `serve` does), so that it can reload."""
    started: list[Relay] = []

    async def start(upstream: ScriptedUpstream, extra: str = "") -> Relay:
        config = tmp_path / "relay.toml"
        config.write_text(CONFIG.format(state=tmp_path / "state", secret=SECRET, extra=extra))
        relay = Relay(load_settings(config), config, upstreams=scripted(upstream))
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.stop(grace=1)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The exposition parsed by prometheus-client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


# --- machine-readable endpoints -----------------------------------------------------------

async def test_healthz_and_readyz_answer_when_the_relay_serves(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    admin = Admin(await relay_factory(), http)
    assert (await admin.get("/healthz"))[:2] == (200, "ok\n")
    assert (await admin.get("/readyz"))[:2] == (200, "ready\n")


async def test_readyz_is_503_with_the_reason_when_the_spool_is_not_writable(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory()
    admin = Admin(relay, http)
    incoming = relay.spool.root / "incoming"
    incoming.rename(relay.spool.root / "incoming.away")
    status, text, _ = await admin.get("/readyz")
    assert status == 503
    assert text.startswith("not ready: the spool is not writable: ") and str(incoming) in text
    assert (await admin.get("/healthz"))[0] == 200
    (relay.spool.root / "incoming.away").rename(incoming)
    assert (await admin.get("/readyz"))[0] == 200


async def test_readyz_is_503_while_the_relay_stops(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream()
    upstream.gate = asyncio.Event()
    relay = await relay_factory(upstreams=scripted(upstream))
    admin = Admin(relay, http)
    queue_id(await send(relay))
    assert relay.scheduler is not None
    await wait_until(lambda: relay.scheduler is not None and relay.scheduler.counts()["active"])
    stopping = asyncio.create_task(relay.stop(grace=5))
    await wait_until(lambda: relay.stopping)
    status, text, _ = await admin.get("/readyz")
    assert (status, text) == (503, "not ready: the relay is stopping\n")
    upstream.gate.set()
    await stopping


async def test_status_is_the_status_command_data_plus_live_counts(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"later@example.com": ["451 4.7.1 greylisted"]})
    relay = await relay_factory(upstreams=scripted(upstream), queue=SLOW_RETRY)
    admin = Admin(relay, http)
    queue_id(await send(relay, "later@example.com"))
    await wait_until(lambda: relay.scheduler is not None
                     and relay.scheduler.counts()["deferred"] == 1)
    async with http.get(admin.base + "/status") as r:
        assert r.status == 200 and r.content_type == "application/json"
        report = await r.json()
    assert report["account"] == {
        "system_email_account": "Active", "system_email_address": "relay@localhost",
        "email_server": "local", "from_header": "rewrite", "authentication": "(Unused)",
        "outgoing_server": f"built-in outbox {relay.settings.outbox}", "port": None,
        "encryption": None, "timeout": None}
    assert report["queue"]["deferred"] == 1 and report["daemon"]["running"] is True
    assert report["live"]["queue"] == {"queued": 0, "deferred": 1, "held": 0, "dead": 0,
                                       "active": 0}
    assert report["live"]["listener"] == f"127.0.0.1:{listener_port(relay)}"


async def test_metrics_move_as_mail_flows_failures_and_deferrals_included(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"gone@example.com": ["550 5.1.1 no such user"],
                                 "later@example.com": ["451 4.7.1 greylisted"]})
    relay: Relay = await file_relay(upstream)
    admin = Admin(relay, http)
    before = samples((await admin.get("/metrics"))[1])
    assert value(before, "relay_messages_received_total") == 0
    assert value(before, "relay_queue_messages", state="dead") == 0

    for rcpt in ("ok@example.com", "gone@example.com", "later@example.com"):
        queue_id(await send(relay, rcpt))
    big = b"Subject: big\r\n\r\n" + b"x" * 10_000 + b"\r\n.\r\n"
    assert (await send(relay, body=big)).startswith("552 5.3.4")
    assert relay.scheduler is not None
    await wait_until(lambda: relay.scheduler is not None
                     and relay.scheduler.counts()["deferred"] == 1 and relay.scheduler.dead == 1
                     and len(upstream.received) == 1)
    session = await RawSMTP.connect(listener_port(relay))
    await wait_until(lambda: relay.metrics.smtp_sessions._value.get() == 1)
    assert relay.reload()

    status, text, headers = await admin.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    after = samples(text)
    await session.close()
    assert value(after, "relay_messages_received_total") == 3
    assert value(after, "relay_messages_rejected_total", reason="size") == 1
    for result in ("ok", "failed", "deferred"):
        assert value(after, "relay_deliveries_total", server="system", result=result) == 1
    assert value(after, "relay_delivery_seconds_count", server="system") == 3
    assert value(after, "relay_queue_messages", state="deferred") == 1
    assert value(after, "relay_queue_messages", state="dead") == 1
    assert value(after, "relay_queue_messages", state="queued") == 0
    assert value(after, "relay_queue_oldest_seconds") > 0
    assert value(after, "relay_smtp_sessions") == 1
    assert value(after, "relay_config_reloads_total", result="ok") == 1
    assert value(after, "relay_config_reloads_total", result="error") == 0


async def test_every_metric_of_the_design_is_exposed_with_its_labels(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory()
    relay.metrics.auth_failures.labels("system", "PLAIN")
    relay.metrics.pop_before_smtp.labels("system", "ok")
    relay.metrics.oauth_token_expiry.labels("google").set(1.0)
    relay.metrics.oauth_refresh.labels("google", "ok")
    relay.metrics.upstream_sessions.labels("system")
    relay.metrics.deliveries.labels("local", "ok")
    relay.metrics.delivery_seconds.labels("local")
    relay.metrics.messages_rejected.labels("network")
    families = {f.name: f for f in text_string_to_metric_families(
        (await Admin(relay, http).get("/metrics"))[1])}
    design = {
        "relay_messages_received": ("counter", set()),
        "relay_messages_rejected": ("counter", {"reason"}),
        "relay_deliveries": ("counter", {"server", "result"}),
        "relay_delivery_seconds": ("histogram", {"server"}),
        "relay_queue_messages": ("gauge", {"state"}),
        "relay_queue_oldest_seconds": ("gauge", set()),
        "relay_upstream_sessions": ("gauge", {"server"}),
        "relay_auth_failures": ("counter", {"server", "method"}),
        "relay_pop_before_smtp": ("counter", {"server", "result"}),
        "relay_oauth_token_expiry_timestamp_seconds": ("gauge", {"client"}),
        "relay_oauth_refresh": ("counter", {"client", "result"}),
        "relay_smtp_sessions": ("gauge", set()),
        "relay_config_reloads": ("counter", {"result"}),
    }
    for name, (kind, labels) in design.items():
        assert families[name].type == kind, name
        sample = next(s for s in families[name].samples if not s.name.endswith("_created"))
        assert set(sample.labels) - {"le"} == labels, name


# --- the page --------------------------------------------------------------------------------

async def test_page_shows_the_account_in_the_seed_terms_and_never_a_secret(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    relay: Relay = await file_relay(ScriptedUpstream())
    admin = Admin(relay, http)
    status, page, headers = await admin.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    for label, shown in [("System e-mail account", "Active"),
                         ("System e-mail address", "notify@example.com"),
                         ("E-mail server to be used",
                          "system (Configure e-mail server for system e-mail)"),
                         ("Outgoing e-mail server name (SMTP)", "127.0.0.1"),
                         ("Outgoing e-mail server port number", "2"),
                         ("Encryption", "Disable"), ("Time-out Period", "10 seconds"),
                         ("SMTP authentication method", "PLAIN"),
                         ("Account for sending", "notify"),
                         ("Authenticate before sending e-mail (POP before SMTP)", "Not set")]:
        assert f"{label} {shown}" in text, label
    assert "System e-mail account details" in text and "Change" not in text
    for path in ("/", "/status", "/metrics", "/change"):
        assert SECRET not in (await admin.get(path))[1], path


async def test_every_response_forbids_framing_and_sniffing_with_a_strict_csp(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    admin = Admin(await relay_factory(), http)
    for path in ("/", "/metrics", "/status", "/healthz", "/admin.css", "/nowhere"):
        _, _, headers = await admin.get(path)
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, path
        assert "script-src" not in csp and "unsafe" not in csp, path


async def test_retry_button_sends_a_deferred_message_now(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"later@example.com": ["451 4.7.1 greylisted", "250 2.0.0 ok"]})
    relay = await relay_factory(upstreams=scripted(upstream), queue=SLOW_RETRY)
    admin = Admin(relay, http)
    qid = queue_id(await send(relay, "later@example.com"))
    await wait_until(lambda: relay.scheduler is not None
                     and relay.scheduler.counts()["deferred"] == 1)
    _, page, _ = await admin.get("/")
    assert f'action="/queue/{qid}/retry"' in page and "451 4.7.1 greylisted" in page
    status, _, headers = await admin.post(f"/queue/{qid}/retry", {"csrf": await admin.csrf()})
    assert status == 303 and headers["Location"] == f"/?done=retried&id={qid}#messages"
    await wait_until(lambda: len(upstream.received) == 1)
    _, page, _ = await admin.get(headers["Location"])
    assert f"Message {qid} is due now" in page and "250 2.0.0 ok" in page


async def test_delete_button_removes_a_dead_letter(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"gone@example.com": ["550 5.1.1 no such user"]})
    relay = await relay_factory(upstreams=scripted(upstream))
    admin = Admin(relay, http)
    qid = queue_id(await send(relay, "gone@example.com"))
    await wait_until(lambda: relay.spool.ids("dead") == [qid])
    status, _, _ = await admin.post(f"/queue/{qid}/delete", {"csrf": await admin.csrf()})
    assert status == 303 and relay.spool.find(qid) is None
    await wait_until(lambda: relay.scheduler is not None and relay.scheduler.dead == 0)


async def test_a_post_without_our_csrf_token_or_from_another_site_changes_nothing(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"gone@example.com": ["550 5.1.1 no such user"]})
    relay = await relay_factory(upstreams=scripted(upstream))
    admin = Admin(relay, http)
    qid = queue_id(await send(relay, "gone@example.com"))
    await wait_until(lambda: relay.spool.ids("dead") == [qid])
    token = await admin.csrf()
    for form, headers in [({}, {}), ({"csrf": "x" * 43}, {}),
                          ({"csrf": token}, {"Origin": "http://evil.example"}),
                          ({"csrf": token}, {"Sec-Fetch-Site": "cross-site"})]:
        status, _, _ = await admin.post(f"/queue/{qid}/delete", form, headers=headers)
        assert status == 403, (form, headers)
    assert relay.spool.ids("dead") == [qid]


async def test_send_test_message_shows_the_listener_and_the_upstream_answers(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"ops@example.com": ["250 2.0.0 Ok: queued as 4XyZ"]})
    relay = await relay_factory(upstreams=scripted(upstream))
    admin = Admin(relay, http)
    status, page, _ = await admin.post("/send-test", {"csrf": await admin.csrf(),
                                                      "to": "ops@example.com"})
    assert status == 200
    assert re.search(r"Listener: <code>250 2\.0\.0 OK queued as [0-9A-F]{21}</code>", page)
    assert "Upstream (ops@example.com, delivered): <code>250 2.0.0 Ok: queued as 4XyZ" in page
    assert upstream.received[0][1] == ["ops@example.com"]


async def test_oauth_shows_not_granted_with_the_provider_sign_in_button(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory(
        upstreams=scripted(ScriptedUpstream()),
        system_account={"address": "notify@example.com", "server": "gmail"},
        servers={"gmail": {"oauth": {"client": "google"}}},
        oauth_clients={"google": {"provider": "google", "client_id": "id.apps",
                                  "client_secret": SECRET}})
    admin = Admin(relay, http)
    _, page, _ = await admin.get("/")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "OAuth client google (google)" in text and "Use OAuth to send e-mails Yes" in text
    assert "OAuth credential a person signs in once (Sign in with Google)" in text
    assert "OAuth authorization Not granted" in text and SECRET not in page
    assert '<a class="button sign-in" href="/oauth/start?client=google">Sign in with Google</a>' \
        in page
    status, _, headers = await admin.get("/oauth/start?client=google")
    assert status == 302 and headers["Location"].startswith(
        "https://accounts.google.com/o/oauth2/v2/auth?")
    query = parse_qs(urlsplit(headers["Location"]).query)
    assert query["redirect_uri"] == [f"{admin.base}/oauth/callback"]
    status, page, _ = await admin.get("/oauth/callback?state=forged&code=x")
    assert status == 400 and "nothing was stored" in page


# --- access ------------------------------------------------------------------------------

async def test_a_wrong_or_missing_token_gets_a_bare_401_on_every_endpoint(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory(admin={"token": "tok-" + "a" * 30})
    admin = Admin(relay, http)
    bodies = set()
    for path in ("/", "/metrics", "/status", "/healthz", "/readyz", "/change", "/nowhere"):
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic " + "YWRtaW46d3Jvbmc="}):
            status, body, got = await admin.get(path, headers=headers)
            assert status == 401, (path, headers)
            assert got["WWW-Authenticate"].startswith("Basic realm=")
            bodies.add(body)
    assert bodies == {"401 Unauthorized\n"}
    good = {"Authorization": "Bearer tok-" + "a" * 30}
    assert (await admin.get("/healthz", headers=good))[0] == 200
    basic = "Basic " + base64.b64encode(b"admin:tok-" + b"a" * 30).decode()
    assert (await admin.get("/metrics", headers={"Authorization": basic}))[0] == 200


async def test_without_a_token_only_loopback_host_names_are_served(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    admin = Admin(await relay_factory(), http)
    assert (await admin.get("/status", headers={"Host": "rebound.example"}))[0] == 401
    assert (await admin.get("/status", headers={"Host": "localhost"}))[0] == 200


async def test_a_non_loopback_admin_host_without_a_token_refuses_to_start(
        state_dir: Path) -> None:
    from tests.support import settings_for
    relay = Relay(settings_for(state_dir, admin={"host": "0.0.0.0"}))
    with pytest.raises(ConfigError, match=r"admin.host = '0.0.0.0' is not a loopback address: "
                                          r"set admin.token_file"):
        await relay.start()
    assert relay.listener is None


async def test_serve_refuses_a_non_loopback_admin_host_without_a_token(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n[listener]\nport = {port}\n'
                      '[admin]\nhost = "0.0.0.0"\n')
    daemon = Daemon(config, tmp_path / "relay.log", port)
    with pytest.raises(AssertionError, match="serve exited with 2"):
        await asyncio.to_thread(daemon.start)
    assert "set admin.token_file (or admin.token)" in daemon.log_text()


async def test_a_non_loopback_admin_host_with_a_token_serves_with_it(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory(admin={"host": "0.0.0.0", "token": "t" * 32})
    admin = Admin(relay, http)
    assert (await admin.get("/healthz"))[0] == 401
    assert (await admin.get("/healthz", headers={"Authorization": "Bearer " + "t" * 32}))[0] \
        == 200


# --- the Change form -----------------------------------------------------------------------

def form_from(page: str) -> dict[str, str]:
    """The values a browser would submit from the change page, untouched."""
    form: dict[str, str] = {}
    for tag in re.findall(r"<input [^>]*>", page):
        name = re.search(r'name="([^"]+)"', tag)
        val = re.search(r'value="([^"]*)"', tag)
        kind = re.search(r'type="([^"]+)"', tag)
        if not name:
            continue
        if kind and kind.group(1) in ("radio", "checkbox") and " checked" not in tag:
            continue
        form[name.group(1)] = val.group(1) if val else ""
    for name, body in re.findall(r'<select id="[^"]+" name="([^"]+)">(.*?)</select>', page,
                                 re.S):
        chosen = re.search(r'<option value="([^"]*)" selected>', body) or \
            re.search(r'<option value="([^"]*)"', body)
        form[name] = chosen.group(1) if chosen else ""
    return form


async def test_change_is_refused_unless_allowed(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    relay: Relay = await file_relay(ScriptedUpstream())
    admin = Admin(relay, http)
    assert (await admin.get("/change"))[0] == 403
    status, _, _ = await admin.post("/change", {"csrf": await admin.csrf(), "timeout": "30"})
    assert status == 403
    assert not (relay.settings.state_dir / OVERRIDES_FILE).exists()


async def test_change_saves_an_override_file_and_applies_it_keeping_the_queue(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"later@example.com": ["451 4.7.1 greylisted"]})
    relay: Relay = await file_relay(upstream, "[admin]\nallow_changes = true\n")
    admin = Admin(relay, http)
    qid = queue_id(await send(relay, "later@example.com"))
    await wait_until(lambda: relay.scheduler is not None
                     and relay.scheduler.counts()["deferred"] == 1)
    status, page, _ = await admin.get("/change")
    assert status == 200 and SECRET not in page
    form = form_from(page)
    assert form["timeout"] == "10" and form["auth_method"] == "PLAIN"
    assert form["auth_password"] == ""
    form.update(timeout="30", address="alerts@example.com")
    status, _, headers = await admin.post("/change", form)
    assert (status, headers["Location"]) == (303, "/?done=saved")

    override = relay.settings.state_dir / OVERRIDES_FILE
    assert stat.S_IMODE(override.stat().st_mode) == 0o600
    assert relay.settings.servers["system"].timeout == 30
    assert relay.settings.system_account.address == "alerts@example.com"
    auth = relay.settings.servers["system"].auth
    assert auth is not None and auth.secret() == SECRET  # an empty password field keeps it
    assert relay.spool.find(qid) is not None and relay.scheduler is not None
    assert relay.scheduler.counts()["deferred"] == 1
    assert relay.config_file is not None
    reread = load_settings(relay.config_file)  # what `sysmail-relay status` reads
    assert reread.servers["system"].timeout == 30
    _, page, _ = await admin.get("/?done=saved")
    assert "30 seconds" in page and "alerts@example.com" in page


async def test_a_bad_value_shows_the_line_check_prints_and_changes_nothing(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    relay: Relay = await file_relay(ScriptedUpstream(), "[admin]\nallow_changes = true\n")
    admin = Admin(relay, http)
    form = form_from((await admin.get("/change"))[1])
    form.update(timeout="500")
    status, page, _ = await admin.post("/change", form)
    assert status == 400 and "Nothing was changed" in page
    assert relay.config_file is not None
    bad = tmp_path / "bad.toml"
    bad.write_text(relay.config_file.read_text().replace('encryption = "none"',
                                                         'encryption = "none"\ntimeout = 500'))
    assert cli.main(["check", "--config", str(bad)]) == 2
    line = capsys.readouterr().err.splitlines()[1].strip()
    assert line == "servers.system.timeout: must be between 1 and 120 seconds (got 500)"
    assert f"<code>{line}</code>" in page
    assert not (relay.settings.state_dir / OVERRIDES_FILE).exists()
    assert relay.settings.servers["system"].timeout == 10
    assert 'value="500"' in page  # the form comes back as it was typed


async def test_authentication_can_be_switched_off_and_a_new_password_is_write_only(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    relay: Relay = await file_relay(ScriptedUpstream(), "[admin]\nallow_changes = true\n")
    admin = Admin(relay, http)
    form = form_from((await admin.get("/change"))[1])
    form.update(auth_password="N3w-Secret!")
    assert (await admin.post("/change", form))[0] == 303
    auth = relay.settings.servers["system"].auth
    assert auth is not None and auth.secret() == "N3w-Secret!"
    page = (await admin.get("/change"))[1]
    assert "N3w-Secret!" not in page and "N3w-Secret!" not in (await admin.get("/"))[1]
    form = form_from(page)
    form.update(auth_method="")
    assert (await admin.post("/change", form))[0] == 303
    assert relay.settings.servers["system"].auth is None  # although relay.toml has [auth]
    assert "SMTP authentication method</th><td>(Unused)" in (await admin.get("/"))[1]


@pytest.mark.parametrize("change", [{"host": "attacker.example"}, {"port": "2525"},
                                    {"encryption": "tls"}], ids=["host", "port", "encryption"])
async def test_moving_the_server_without_entering_the_password_again_is_refused(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession,
        change: dict[str, str]) -> None:
    relay: Relay = await file_relay(ScriptedUpstream(), "[admin]\nallow_changes = true\n")
    admin = Admin(relay, http)
    page = (await admin.get("/change"))[1]
    assert "for the same server only" in page
    form = form_from(page)
    form.update(change)
    status, page, _ = await admin.post("/change", form)
    assert status == 400 and "Nothing was changed" in page
    assert "enter the password for sending again" in page and SECRET not in page
    assert not (relay.settings.state_dir / OVERRIDES_FILE).exists()
    assert relay.settings.servers["system"].host == "127.0.0.1"
    form.update(auth_password="Typed-Again-1")  # the password for the new server: saved
    assert (await admin.post("/change", form))[0] == 303
    moved = relay.settings.servers["system"]
    assert moved.auth is not None and moved.auth.secret() == "Typed-Again-1"
    assert SECRET not in (relay.settings.state_dir / OVERRIDES_FILE).read_text()


POP_CONFIG = """[admin]
allow_changes = true
[servers.mail]
host = "127.0.0.1"
port = 3
encryption = "starttls"
[servers.mail.pop_before_smtp]
host = "pop.example.com"
encryption = "tls"
username = "notify"
password = "Pop-S3cret"
"""


async def test_moving_the_pop_server_without_entering_its_password_again_is_refused(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    relay: Relay = await file_relay(ScriptedUpstream(), POP_CONFIG)
    admin = Admin(relay, http)
    form = form_from((await admin.get("/change"))[1])
    form.update(server="mail", edited_server="mail", host="127.0.0.1", port="3",
                encryption="starttls", auth_method="", pop="set", pop_host="pop.example.com",
                pop_encryption="tls", pop_username="notify", pop_port="", pop_timeout="10",
                pop_wait="0")
    assert (await admin.post("/change", form))[0] == 303  # same POP server: kept
    pop = relay.settings.servers["mail"].pop_before_smtp
    assert pop is not None and pop.secret() == "Pop-S3cret"
    form.update(pop_host="pop.attacker.example")
    status, page, _ = await admin.post("/change", form)
    assert status == 400 and "enter the password for receiving again" in page
    pop = relay.settings.servers["mail"].pop_before_smtp
    assert pop is not None and pop.host == "pop.example.com"


async def test_a_reload_that_leaves_auth_in_clear_logs_the_start_up_warning(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    relay: Relay = await file_relay(ScriptedUpstream(), "[admin]\nallow_changes = true\n")
    admin = Admin(relay, http)
    form = form_from((await admin.get("/change"))[1])
    caplog.clear()
    form.update(timeout="20")
    assert (await admin.post("/change", form))[0] == 303
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("servers.system: the password is sent without encryption" in w
               for w in warned), warned
    caplog.clear()
    assert relay.reload()  # what SIGHUP does
    assert any("the password is sent without encryption" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")


async def test_pop_password_in_clear_is_warned_on_the_page_status_and_reload(
        file_relay: Callable[..., Any], http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    in_clear = POP_CONFIG.replace('encryption = "tls"\nusername', 'username')
    relay: Relay = await file_relay(ScriptedUpstream(), in_clear)
    admin = Admin(relay, http)
    expected = "servers.mail.pop_before_smtp: the POP password is sent without encryption"
    assert expected in (await admin.get("/"))[1]
    assert any(expected in w for w in json.loads((await admin.get("/status"))[1])["warnings"])
    caplog.clear()
    assert relay.reload()
    assert any(expected in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_the_override_file_writer_round_trips_through_tomllib() -> None:
    data = {"system_account": {"active": False, "address": "a@b.example", "server": "system"},
            "servers": {"system": {"host": "smtp.example.com", "port": 587, "timeout": 30,
                                   "auth": {"method": "PLAIN", "password": 'q"\\\x7f\n\té'}},
                        "odd name.x": {"host": "h", "rate_limit": "30/min", "x": [1, "a"]}}}
    assert tomllib.loads(dump_toml(data)) == data


# --- queue.notify ----------------------------------------------------------------------------

async def test_a_dead_letter_is_reported_to_queue_notify_once(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    upstream = ScriptedUpstream({"gone@example.com": ["550 5.1.1 <gone@example.com>: no such "
                                                      "user"]})
    relay = await relay_factory(upstreams=scripted(upstream),
                                queue={"notify": "postmaster@example.com"})
    qid = queue_id(await send(relay, "gone@example.com"))
    await wait_until(lambda: len(upstream.received) == 1)
    mail_from, rcpts, data = upstream.received[0]
    assert (mail_from, rcpts) == ("relay@localhost", ["postmaster@example.com"])
    text = data.decode()
    assert "Subject: Undelivered notification: Disk alert" in text
    assert f"X-Sysmail-Relay-Dead-Letter: {qid}" in text
    assert "<gone@example.com>: failed (550 5.1.1 <gone@example.com>: no such user)" in text
    assert "Original sender: <app@example.com>" in text

    admin = Admin(relay, http)  # retried from the page, it dies again: no second report
    assert (await admin.post(f"/queue/{qid}/retry", {"csrf": await admin.csrf()}))[0] == 303
    await wait_until(lambda: upstream.attempts["gone@example.com"] == 2
                     and relay.spool.ids("dead") == [qid])
    await asyncio.sleep(0.2)
    assert len(upstream.received) == 1


async def test_no_report_is_sent_about_a_report(relay_factory: RelayFactory) -> None:
    upstream = ScriptedUpstream({"gone@example.com": ["550 5.1.1 no such user"],
                                 "postmaster@example.com": ["550 5.1.1 no such user"]})
    relay = await relay_factory(upstreams=scripted(upstream),
                                queue={"notify": "postmaster@example.com"})
    queue_id(await send(relay, "gone@example.com"))
    await wait_until(lambda: len(relay.spool.ids("dead")) == 2)
    await asyncio.sleep(0.2)
    assert len(relay.spool.ids("dead")) == 2 and upstream.attempts["postmaster@example.com"] == 1


# --- deploy/ and docs/metrics.md -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def exported_names() -> dict[str, str]:
    """Every name the relay exposes (families and their series) -> the family's type."""
    names: dict[str, str] = {}
    metrics = Metrics()
    # relay_fleet_*: registered only with [fleet] (a single relay has no such series)
    Fleet(Settings(fleet={"url": "redis://127.0.0.1:1/0"}, state_dir=Path("/nonexistent")),
          metrics, dict)
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["", "_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = family.type
    return names


def test_the_dashboard_the_alerts_and_the_docs_name_only_metrics_that_exist() -> None:
    exported = exported_names()
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert all(p["type"] == "row" or p["targets"] for p in dashboard["panels"])
    alerts = (ROOT / "deploy" / "prometheus-alerts.yml").read_text()
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for where, text in [("dashboard", "\n".join(exprs)), ("alerts", alerts), ("docs", docs)]:
        used = set(re.findall(r"\brelay_[a-z_]+[a-z]", text))
        assert used - set(exported) == set(), where
    documented = set(re.findall(r"^\| `(relay_[a-z_]+)` \|", docs, re.M))
    assert documented == {n for n, kind in exported.items()
                          if kind != "histogram" or not n.endswith(("_bucket", "_sum", "_count"))}
    for watched in ("queue_messages", "queue_oldest_seconds", "auth_failures_total",
                    "oauth_token_expiry_timestamp_seconds"):
        assert f"relay_{watched}" in alerts
