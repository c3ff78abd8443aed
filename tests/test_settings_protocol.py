"""`[servers.NAME] protocol`: graph and gmail_api servers, what they need, what they refuse."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from relay.errors import ConfigError
from relay.oauth.providers import endpoints
from relay.oauth.state import protocol_for
from relay.settings import RateLimit, Settings, validate
from tests.support import relay_command

MICROSOFT = {"provider": "microsoft", "client_id": "app-id", "client_secret": "s",
             "grant": "client_credentials", "tenant": "contoso.onmicrosoft.com"}
GOOGLE = {"provider": "google", "client_id": "id.apps.googleusercontent.com",
          "client_secret": "s"}


def settings(server: dict[str, Any], **servers: dict[str, Any]) -> Settings:
    return validate({"state_dir": "/tmp/unused", "system_account": {
        "address": "notify@example.com", "server": "api"},
        "servers": {"api": server, **servers},
        "oauth_clients": {"ms": MICROSOFT, "google": GOOGLE}}, "test")


def asked_scopes(found: Settings, client: str) -> list[str]:
    """The scopes the relay asks the provider for, for what the client's server is."""
    return endpoints(client, found.oauth_clients[client], protocol_for(found, client)).scopes


def problems(server: dict[str, Any], **servers: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(server, **servers)
    return "\n".join(caught.value.problems)


def test_graph_server_gets_graphs_url_scope_and_exchange_limits_by_default() -> None:
    found = settings({"protocol": "graph", "oauth": {"client": "ms"}})
    server = found.servers["api"]
    assert server.api_url == "https://graph.microsoft.com"
    assert server.rate_limit == RateLimit(count=30, seconds=60)
    assert server.max_recipients_per_day == 10_000
    assert asked_scopes(found, "ms") == ["https://graph.microsoft.com/.default"]
    assert server.host is None and server.login_method == "Bearer"


def test_gmail_api_server_gets_the_send_scope_and_the_workspace_limit() -> None:
    found = settings({"protocol": "gmail_api", "oauth": {"client": "google"},
                      "max_recipients_per_day": 500})
    server = found.servers["api"]
    assert server.api_url == "https://gmail.googleapis.com" and server.rate_limit is None
    assert server.max_recipients_per_day == 500  # what is written wins over the preset
    assert asked_scopes(found, "google")[0] == \
        "https://www.googleapis.com/auth/gmail.send"


@pytest.mark.parametrize(("server", "says"), [
    ({"protocol": "graph", "host": "smtp.office365.com", "port": 587,
      "oauth": {"client": "ms"}}, 'host, port: only for protocol = "smtp"'),
    ({"protocol": "graph", "auth": {"method": "PLAIN", "username": "u", "password": "p"}},
     'auth: only for protocol = "smtp"'),
    ({"protocol": "gmail_api"}, 'protocol = "gmail_api" needs [servers.NAME.oauth]'),
    ({"protocol": "graph", "oauth": {"client": "google"}}, "Graph takes Microsoft tokens"),
    ({"host": "smtp.example.com", "graph_url": "https://graph.microsoft.us"},
     'graph_url is only for protocol = "graph"'),
    ({"protocol": "graph", "graph_url": "graph.microsoft.us", "oauth": {"client": "ms"}},
     "graph_url must be an https:// URL"),
    ({"protocol": "graph", "oauth": {"client": "ms"}, "fallback_server": "nowhere"},
     "servers.api.fallback_server = 'nowhere' must name another [servers.NAME]"),
    ({"host": "smtp.example.com", "fallback_server": "api"},
     'fallback_server is only for protocol = "graph" or "gmail_api"'),
])
def test_mistakes_in_an_http_server_are_refused_with_the_fix(server: dict[str, Any],
                                                             says: str) -> None:
    assert says in problems(server)


def test_one_client_cannot_serve_an_smtp_and_an_api_server() -> None:
    found = problems({"protocol": "graph", "oauth": {"client": "ms"}},
                     smtp={"oauth": {"client": "ms"}})
    assert "oauth_clients.ms serves servers.smtp (smtp) and servers.api (graph)" in found
    assert "give each its own [oauth_clients] entry" in found


def test_check_names_the_key_of_a_refused_http_server(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[system_account]
address = "notify@example.com"
server = "graph"
[servers.graph]
protocol = "graph"
encryption = "starttls"
[servers.graph.oauth]
client = "ms"
[oauth_clients.ms]
provider = "microsoft"
client_id = "app-id"
client_secret = "s"
grant = "client_credentials"
""")
    result = subprocess.run([relay_command(), "--config", str(config), "check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert ('servers.graph: encryption: only for protocol = "smtp"; a graph server is '
            "reached at graph_url") in result.stderr + result.stdout
