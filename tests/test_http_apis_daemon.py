"""The installed `sysmail-relay serve` with a Graph or Gmail API server, as an operator runs it.

The APIs are the strict stand-ins of tests/api_servers.py (the real Microsoft and
Google endpoints are not reached from here), the tokens come from the test OAuth
server (client_credentials with a client secret file). `sysmail-sendmail -t`,
`check --connect`, `status`, the admin page and `send-test` are run as commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.api_servers import GmailServer, GraphServer
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer
from tests.support import Daemon, free_port, relay_command

SENDMAIL = Path(sys.executable).parent / "sysmail-sendmail"


@pytest.fixture(scope="module")
def authority() -> Iterator[AuthServer]:
    server = AuthServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def apis(authority: AuthServer) -> Iterator[dict[str, GraphServer | GmailServer]]:
    graph = GraphServer(f"{authority.url}/introspect", {USER})
    gmail = GmailServer(f"{authority.url}/introspect", {USER})
    yield {"graph": graph, "gmail_api": gmail}
    graph.close()
    gmail.close()


@pytest.fixture
def provider(authority: AuthServer) -> AuthServer:
    authority.reset()
    authority.app_permissions[CLIENT_ID] = {"Mail.Send"}  # admin consent for Graph
    return authority


@pytest.fixture
def graph(apis: dict[str, GraphServer | GmailServer], provider: AuthServer) -> GraphServer:
    server = apis["graph"]
    assert isinstance(server, GraphServer)
    server.reset()
    server.can_read_users = True
    return server


@pytest.fixture
def gmail(apis: dict[str, GraphServer | GmailServer], provider: AuthServer) -> GmailServer:
    server = apis["gmail_api"]
    assert isinstance(server, GmailServer)
    server.reset()
    return server


def write_config(tmp_path: Path, protocol: str, url: str, provider: AuthServer) -> Path:
    secret = tmp_path / "client_secret"
    secret.write_text(CLIENT_SECRET)
    secret.chmod(0o600)
    key = "graph_url" if protocol == "graph" else "gmail_url"
    config = tmp_path / "relay.toml"
    config.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[listener]
port = {free_port()}
[system_account]
address = "{USER}"
server = "api"
[queue]
retry_initial = "0.5s"
retry_max = "1s"
[servers.api]
protocol = "{protocol}"
{key} = "{url}"
timeout = 5
[servers.api.oauth]
client = "app"
[oauth_clients.app]
provider = "generic"
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
grant = "client_credentials"
token_url = "{provider.url}/token"
""")
    return config


def start(config: Path, tmp_path: Path) -> Daemon:
    port = int(re.search(r"port = (\d+)", config.read_text()).group(1))  # type: ignore[union-attr]
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    return daemon


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([relay_command(), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def wait_for(predicate, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def queue_counts(config: Path) -> dict[str, int]:
    counts: dict[str, int] = json.loads(run(config, "status", "--json").stdout)["queue"]
    return counts


@pytest.mark.parametrize("protocol", ["graph", "gmail_api"])
def test_sendmail_t_reaches_exactly_its_recipients_through_the_api(
        tmp_path: Path, daemons: list[Daemon], provider: AuthServer,
        apis: dict[str, GraphServer | GmailServer], protocol: str) -> None:
    api = apis[protocol]
    api.reset()
    config = write_config(tmp_path, protocol, api.url, provider)
    daemons.append(start(config, tmp_path))
    message = (b"From: Workflow <workflow@apps.example.com>\nTo: Boss <boss@example.com>\n"
               b"Cc: deputy@example.com\nBcc: audit@example.com\nSubject: Approval\n\n"
               b"Please approve request 7.\n")
    result = subprocess.run([str(SENDMAIL), "-t", "-i", "archive@example.com"], input=message,
                            capture_output=True, timeout=60,
                            env={**os.environ, "RELAY_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(api.delivered()) == 1)
    (sent,) = api.delivered()
    assert sent.recipients == {"boss@example.com", "deputy@example.com", "audit@example.com",
                               "archive@example.com"}
    seen = message_from_bytes(sent.seen)
    assert (seen["To"], seen["Cc"], seen["Bcc"]) == ("Boss <boss@example.com>",
                                                     "deputy@example.com", None)
    assert b"audit@" not in sent.seen and b"archive@" not in sent.seen
    assert seen["From"] == f"Workflow <{USER}>"


def test_check_connect_shows_the_token_and_the_mailbox_and_sends_nothing(
        tmp_path: Path, graph: GraphServer, provider: AuthServer) -> None:
    config = write_config(tmp_path, "graph", graph.url, provider)
    result = run(config, "check", "--connect")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"from {provider.url}/token" in out
    assert "scopes Mail.Send" in out and "valid until" in out  # the consented role
    assert f"GET /v1.0/users/{USER}?$select=id,mail" in out and "mailbox found" in out
    assert "not tried: `check --connect` sends nothing" in out
    assert graph.delivered() == [] and graph.answers == [200]
    assert not any(token in out for token in [*provider.issued(), CLIENT_SECRET])


def test_check_connect_when_the_app_may_not_read_users_says_sending_may_still_work(
        tmp_path: Path, graph: GraphServer, provider: AuthServer) -> None:
    graph.can_read_users = False
    result = run(write_config(tmp_path, "graph", graph.url, provider), "check", "--connect")
    assert result.returncode == 0, result.stdout
    assert "HTTP 403 Authorization_RequestDenied" in result.stdout
    assert "User.Read.All" in result.stdout and "sending may still work" in result.stdout


def test_check_connect_for_gmail_reads_the_profile_and_explains_the_send_only_scope(
        tmp_path: Path, gmail: GmailServer, provider: AuthServer) -> None:
    result = run(write_config(tmp_path, "gmail_api", gmail.url, provider), "check",
                 "--connect")
    assert result.returncode == 0, result.stdout
    assert f"GET /gmail/v1/users/{USER}/profile" in result.stdout
    assert "insufficientPermissions" in result.stdout
    assert "sending may still work" in result.stdout


def test_check_connect_fails_when_the_token_is_refused(
        tmp_path: Path, graph: GraphServer, provider: AuthServer) -> None:
    config = write_config(tmp_path, "graph", graph.url, provider)
    (tmp_path / "client_secret").write_text("wrong")
    result = run(config, "check", "--connect")
    assert result.returncode == 1
    assert "OAuth token" in result.stdout and "FAILED" in result.stdout
    assert "invalid_client" in result.stdout and graph.answers == []


def test_status_the_page_and_send_test_with_a_graph_server(
        tmp_path: Path, daemons: list[Daemon], graph: GraphServer,
        provider: AuthServer) -> None:
    config = write_config(tmp_path, "graph", graph.url, provider)
    daemons.append(start(config, tmp_path))
    sent = run(config, "send-test", "--to", "ops@example.com")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert ": delivered" in sent.stdout
    assert [d.recipients for d in graph.delivered()] == [{"ops@example.com"}]
    status = run(config, "status")
    assert re.search(r"Protocol\s+Microsoft Graph \(sendMail\)", status.stdout), status.stdout
    assert re.search(rf"API\s+{re.escape(graph.url)}", status.stdout)
    assert "OAuth 2.0 (bearer token), client app" in status.stdout
    source = json.loads(run(config, "status", "--json").stdout)["daemon"]["source"]
    admin = re.search(r"\((http://[^/]+)/status\)", source).group(1)  # type: ignore[union-attr]
    with urllib.request.urlopen(admin + "/", timeout=10) as page:
        html = page.read().decode()
    assert "Microsoft Graph (sendMail)" in html and graph.url in html


def test_deferred_mail_stays_queued_and_goes_once_when_graph_recovers(
        tmp_path: Path, daemons: list[Daemon], graph: GraphServer,
        provider: AuthServer) -> None:
    graph.retry_after = "1"
    graph.fail_next(503, times=2)
    config = write_config(tmp_path, "graph", graph.url, provider)
    daemon = start(config, tmp_path)
    daemons.append(daemon)
    assert run(config, "send-test", "--to", "ops@example.com", "--wait", "0").returncode == 0
    wait_for(lambda: len(graph.delivered()) == 1, timeout=30)
    wait_for(lambda: queue_counts(config)["queued"] + queue_counts(config)["deferred"] == 0)
    assert graph.answers == [503, 503, 202]
    assert "status=deferred" in daemon.log_text() and "Retry-After: 1 s" in daemon.log_text()


def test_two_401s_hold_the_mail_as_not_granted_until_retried(
        tmp_path: Path, daemons: list[Daemon], graph: GraphServer,
        provider: AuthServer) -> None:
    graph.fail_next(401, times=2)
    config = write_config(tmp_path, "graph", graph.url, provider)
    daemons.append(start(config, tmp_path))
    run(config, "send-test", "--to", "ops@example.com", "--wait", "0")
    wait_for(lambda: "not granted" in run(config, "status").stdout)
    wait_for(lambda: queue_counts(config)["held"] == 1)
    assert queue_counts(config)["dead"] == 0 and graph.delivered() == []
    retried = run(config, "queue", "retry", "--all")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    wait_for(lambda: len(graph.delivered()) == 1)
    assert graph.answers == [401, 401, 202]
