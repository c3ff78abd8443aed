"""No secret in anything the relay shows: logs, `status`, /status, /metrics, errors.

`sysmail-relay serve` runs as an operator runs it, at log level debug, with every
kind of secret configured at once: an SMTP AUTH password, a POP-before-SMTP
password, an OAuth client secret with access and refresh tokens (signed in with
`sysmail-relay oauth authorize --device` against tests/oauth_server.py), a client
certificate's private key and a Google service account's JSON key (the signed
assertions made with them), and an admin token. The sending server is switched
between them (SIGHUP), and each is driven through a refusal (wrong password, refused
token, unknown certificate, missing delegation) and then a success.
At every step everything an operator can see is collected: the daemon's log,
`status` and `status --json`, `queue list` and `queue show`, `check --connect`,
`oauth status`, `/status`, `/metrics`, `/readyz`, the admin page, refused admin
requests, and `check`'s errors on broken copies of the configuration. Each secret
is then looked for as it is, in base64 (alone, and as the SASL PLAIN and XOAUTH2
strings that carry it on the wire) and URL-encoded; each line of a private key's PEM
on its own.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import signal
import smtplib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiosmtpd.smtp import SMTP, AuthResult

from relay.oauth.scopes import GOOGLE_MAIL
from tests.oauth_jwt import Certificate, ServiceAccount
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer
from tests.support import Daemon, free_port, relay_command
from tests.upstream.test_pop3 import Pop3Stub
from tests.upstream_servers import Script, Servers

SMTP_PASSWORD = "smtp-pw-" + secrets.token_hex(8)
POP_PASSWORD = "pop-pw-" + secrets.token_hex(8)
ADMIN_TOKEN = "admin-tok-" + secrets.token_hex(12)
APP_ID = "app-" + secrets.token_hex(8)
CERTIFICATE = Certificate.make()
ACCOUNT = ServiceAccount()


class OAuthScript(Script):
    """An aiosmtpd handler offering XOAUTH2: when told to accept, it accepts a token the
    provider says is active (RFC 7662 introspection, as Dovecot asks it)."""

    def __init__(self, provider: AuthServer) -> None:
        super().__init__()
        self.provider = provider
        self.accept = False
        self.tokens: list[str] = []

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        decoded = base64.b64decode(args[1]).decode() if len(args) > 1 else ""
        token = decoded.partition("auth=Bearer ")[2].rstrip("\x01")
        self.tokens.append(token)
        ok = False
        if self.accept:
            async with httpx.AsyncClient(timeout=5) as client:
                answer = await client.post(f"{self.provider.url}/introspect",
                                           data={"token": token})
            ok = answer.json().get("active") is True
        return AuthResult(success=ok, handled=False)


class Peers:
    """The upstream servers, in an event loop of their own thread (the relay is a process)."""

    def __init__(self, provider: AuthServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = Servers()
        self.auth = Script(password="not-yet")  # refuses the relay's password until told
        self.plain = Script()  # the SMTP side of POP before SMTP
        self.oauth = OAuthScript(provider)
        self.pop = Pop3Stub(users={"notify": "not-yet"})
        self.smtp_auth_port = self.call(self.servers.smtp(self.auth))
        self.smtp_plain_port = self.call(self.servers.smtp(self.plain))
        self.smtp_oauth_port = self.call(self.servers.smtp(self.oauth, auth_require_tls=False))
        self.pop_server = self.call(asyncio.start_server(self.pop.handle, "127.0.0.1", 0))
        self.pop_port = self.pop_server.sockets[0].getsockname()[1]

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.pop_server.close()
        self.call(self.servers.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def delivered(self) -> list[str]:
        found = []
        for script in (self.auth, self.plain, self.oauth):
            for message in script.messages:
                m = re.search(rb"Subject: (\S+)", message.data)
                found.append(m.group(1).decode() if m else "?")
        return found


@pytest.fixture
def provider() -> Iterator[AuthServer]:
    server = AuthServer().start()
    yield server
    server.close()


@pytest.fixture
def peers(provider: AuthServer) -> Iterator[Peers]:
    p = Peers(provider)
    yield p
    p.close()


def write_config(tmp_path: Path, port: int, peers: Peers, provider: AuthServer,
                 server: str) -> Path:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    for name, value in (("smtp", SMTP_PASSWORD), ("pop", POP_PASSWORD), ("admin", ADMIN_TOKEN),
                        ("client", CLIENT_SECRET)):
        (secrets_dir / name).write_text(value + "\n")
    cert_file, key_file = CERTIFICATE.write(secrets_dir)
    account_file = ACCOUNT.write(secrets_dir / "sa.json", f"{provider.url}/token")
    provider.jwt.service_accounts[ACCOUNT.client_email] = ACCOUNT  # not delegated yet
    config = tmp_path / "relay.toml"
    config.write_text(f"""\
state_dir = "{tmp_path / 'state'}"

[listener]
port = {port}

[system_account]
address = "{USER}"
server = "{server}"

[servers.smtp]
host = "127.0.0.1"
port = {peers.smtp_auth_port}
encryption = "none"
timeout = 3
[servers.smtp.auth]
method = "PLAIN"
username = "sys"
password_file = "{secrets_dir / 'smtp'}"

[servers.login]
host = "127.0.0.1"
port = {peers.smtp_auth_port}
encryption = "none"
timeout = 3
[servers.login.auth]
method = "LOGIN"
username = "sys"
password_file = "{secrets_dir / 'smtp'}"

[servers.pop]
host = "127.0.0.1"
port = {peers.smtp_plain_port}
encryption = "none"
timeout = 3
[servers.pop.pop_before_smtp]
host = "127.0.0.1"
port = {peers.pop_port}
username = "notify"
password_file = "{secrets_dir / 'pop'}"
timeout = 3

[servers.oauth]
host = "127.0.0.1"
port = {peers.smtp_oauth_port}
encryption = "none"
timeout = 3
[servers.oauth.oauth]
client = "test"

[servers.certapp]
host = "127.0.0.1"
port = {peers.smtp_oauth_port}
encryption = "none"
timeout = 3
[servers.certapp.oauth]
client = "cert"

[servers.svc]
host = "127.0.0.1"
port = {peers.smtp_oauth_port}
encryption = "none"
timeout = 3
[servers.svc.oauth]
client = "sa"

[oauth_clients.cert]
provider = "microsoft"
client_id = "{APP_ID}"
grant = "client_credentials"
token_url = "{provider.url}/token"
client_certificate_file = "{cert_file}"
client_key_file = "{key_file}"

[oauth_clients.sa]
provider = "google"
grant = "service_account"
service_account_file = "{account_file}"

[oauth_clients.test]
provider = "generic"
client_id = "{CLIENT_ID}"
client_secret_file = "{secrets_dir / 'client'}"
authorize_url = "{provider.url}/authorize"
token_url = "{provider.url}/token"
device_url = "{provider.url}/device"
revocation_url = "{provider.url}/revoke"
scopes = ["smtp", "offline_access"]

[queue]
retry_initial = "0.5s"
retry_max = "1s"

[admin]
token_file = "{secrets_dir / 'admin'}"

[log]
level = "debug"
""")
    return config


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met in time: {what}"
        time.sleep(0.05)


class Operator:
    """Everything an operator looks at, collected into `seen`."""

    def __init__(self, tmp_path: Path, config: Path, daemon: Daemon) -> None:
        self.tmp = tmp_path
        self.config = config
        self.daemon = daemon
        self.seen: list[tuple[str, str]] = []

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([relay_command(), "--config", str(self.config), *args],
                                input=stdin, capture_output=True, text=True, timeout=60)
        self.seen.append((f"sysmail-relay {' '.join(args)}", result.stdout + result.stderr))
        return result

    @property
    def admin_url(self) -> str:
        found = re.findall(r"admin listener on (http://\S+?)/ ", self.daemon.log_text())
        assert found, "no admin listener in the log"
        return str(found[-1])

    def http(self, path: str, token: str | None = ADMIN_TOKEN, basic: bool = False) -> int:
        headers = {}
        if token is not None:
            headers["Authorization"] = (
                "Basic " + base64.b64encode(f"admin:{token}".encode()).decode() if basic
                else f"Bearer {token}")
        response = httpx.get(self.admin_url + path, headers=headers, timeout=10)
        self.seen.append((f"GET {path}", "\n".join(
            [str(response.status_code), *(f"{k}: {v}" for k, v in response.headers.items()),
             response.text])))
        return response.status_code

    def look_at_everything(self, queue_id: str | None) -> None:
        for path in ("/status", "/metrics", "/readyz", "/healthz", "/"):
            assert self.http(path) == 200, path
        assert self.http("/status", token=None) == 401
        assert self.http("/metrics", token="wrong-" + ADMIN_TOKEN[:-3]) == 401
        assert self.http("/status", token=ADMIN_TOKEN, basic=True) == 200
        self.cli("status")
        self.cli("status", "--json")
        self.cli("queue", "list")
        self.cli("queue", "list", "--json")
        if queue_id is not None:
            self.cli("queue", "show", queue_id)
        self.cli("check")
        self.cli("check", "--connect")
        self.cli("oauth", "status")
        self.cli("oauth", "status", "--json")

    def send(self, subject: str) -> str:
        """Hand a message to the relay; its queue id."""
        with smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10) as smtp:
            smtp.ehlo()
            smtp.mail("app@apps.example.com")
            smtp.rcpt("boss@example.com")
            code, reply = smtp.data(f"From: app@apps.example.com\r\nSubject: {subject}\r\n"
                                    f"\r\nbody\r\n".encode())
        assert code == 250, reply
        found = re.search(rb"queued as (\w+)", reply)
        assert found, reply
        return found.group(1).decode()

    def switch_to(self, server: str) -> None:
        before = self.daemon.log_text().count("configuration reloaded")
        text = re.sub(r'^server = "\w+"', f'server = "{server}"', self.config.read_text(),
                      flags=re.M)
        self.config.write_text(text)
        self.daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: self.daemon.log_text().count("configuration reloaded") > before,
                 what=f"reload to {server}")


def sign_in(operator: Operator, provider: AuthServer) -> None:
    """`sysmail-relay oauth authorize --device`, the code approved as from another device."""
    proc = subprocess.Popen([relay_command(), "oauth", "authorize", "test", "--device", "--config",
                             str(operator.config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = []
    while line := proc.stdout.readline():
        seen.append(line)
        if "enter the code" in line:
            break
    else:
        raise AssertionError("".join(seen))
    user_code = seen[-1].rsplit(" ", 1)[1].strip()
    assert httpx.get(f"{provider.url}/device/verify", params={"user_code": user_code},
                     timeout=10).status_code == 200
    out, err = proc.communicate(timeout=30)
    operator.seen.append(("sysmail-relay oauth authorize --device", "".join(seen) + out + err))
    assert proc.returncode == 0, out + err


def through_failure_then_success(operator: Operator, peers: Peers, server: str,
                                 refuse: Callable[[], object],
                                 accept: Callable[[], object]) -> None:
    operator.switch_to(server)
    refuse()
    queue_id = operator.send(f"via-{server}")
    wait_for(lambda: f"{queue_id}: server={server} status=deferred" in operator.daemon.log_text(),
             what=f"{server}: a refusal")
    operator.look_at_everything(queue_id)
    accept()
    operator.switch_to(server)  # the operator fixed it and reloads: no auth-failure pause left
    operator.cli("queue", "retry", queue_id)
    wait_for(lambda: f"via-{server}" in peers.delivered(), what=f"{server}: delivery")
    operator.look_at_everything(None)


def broken_copies(operator: Operator) -> None:
    """`check` on configurations with secrets written inline and mistakes beside them."""
    base = operator.config.read_text()
    keys = operator.tmp / "secrets"
    inline = (base.replace(f'password_file = "{operator.tmp / "secrets" / "smtp"}"',
                           f'password = "{SMTP_PASSWORD}"')
                  .replace(f'password_file = "{operator.tmp / "secrets" / "pop"}"',
                           f'password = "{POP_PASSWORD}"')
                  .replace(f'client_secret_file = "{operator.tmp / "secrets" / "client"}"',
                           f'client_secret = "{CLIENT_SECRET}"')
                  .replace(f'token_file = "{operator.tmp / "secrets" / "admin"}"',
                           f'token = "{ADMIN_TOKEN}"'))
    variants = {
        "both password and password_file": inline.replace(
            f'password = "{SMTP_PASSWORD}"',
            f'password = "{SMTP_PASSWORD}"\npassword_file = "/nonexistent"'),
        "password of the wrong type": inline.replace(f'password = "{POP_PASSWORD}"',
                                                     f'password = ["{POP_PASSWORD}"]'),
        "token and token_file": inline.replace(f'token = "{ADMIN_TOKEN}"',
                                               f'token = "{ADMIN_TOKEN}"\n'
                                               'token_file = "/nonexistent"'),
        "unknown method beside a password": inline.replace('method = "PLAIN"',
                                                           'method = "NOPE"'),
        "misspelt key holding the password": inline.replace(
            f'password = "{SMTP_PASSWORD}"', f'pasword = "{SMTP_PASSWORD}"'),
        "misspelt key holding the token": inline.replace(
            f'token = "{ADMIN_TOKEN}"', f'tokn = "{ADMIN_TOKEN}"'),
        "not TOML at all": inline.replace(f'password = "{SMTP_PASSWORD}"',
                                          f'password = {SMTP_PASSWORD}'),
        "a PEM key where the service-account JSON key belongs": inline.replace(
            str(keys / "sa.json"), str(keys / "client.key")),
        "the service-account JSON key where the PEM key belongs": inline.replace(
            str(keys / "client.key"), str(keys / "sa.json")),
    }
    for name, text in variants.items():
        broken = operator.tmp / f"broken-{len(operator.seen)}.toml"
        broken.write_text(text)
        result = subprocess.run([relay_command(), "check", "--config", str(broken)],
                                capture_output=True, text=True, timeout=60)
        operator.seen.append((f"check ({name})", result.stdout + result.stderr))
        assert result.returncode == 2, (name, result.stdout + result.stderr)


def forms(secret: str, user: str | None = None) -> dict[str, str]:
    """The ways a secret could show: as is, base64, SASL PLAIN/LOGIN, XOAUTH2, URL-encoded."""
    b64 = base64.b64encode(secret.encode()).decode()
    found = {"as is": secret, "base64": b64, "url-encoded": quote(secret, safe="")}
    if user is not None:
        found["SASL PLAIN"] = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
        found["XOAUTH2"] = base64.b64encode(
            f"user={user}\x01auth=Bearer {secret}\x01\x01".encode()).decode()
    return found


@pytest.mark.timeout(420)  # about 3 minutes on an idle machine
def test_no_secret_in_logs_status_metrics_admin_pages_or_errors(
        tmp_path: Path, peers: Peers, provider: AuthServer) -> None:
    port = free_port()
    config = write_config(tmp_path, port, peers, provider, server="smtp")
    daemon = Daemon(config, tmp_path / "relay.log", port)
    operator = Operator(tmp_path, config, daemon)
    sign_in(operator, provider)
    daemon.start()
    try:
        operator.look_at_everything(None)

        def set_password(script: Script, value: str) -> Callable[[], None]:
            return lambda: setattr(script, "password", value)

        through_failure_then_success(operator, peers, "smtp",
                                     set_password(peers.auth, "something-else"),
                                     set_password(peers.auth, SMTP_PASSWORD))
        through_failure_then_success(operator, peers, "login",
                                     set_password(peers.auth, "something-else"),
                                     set_password(peers.auth, SMTP_PASSWORD))
        through_failure_then_success(
            operator, peers, "pop",
            lambda: peers.pop.users.update(notify="something-else"),
            lambda: peers.pop.users.update(notify=POP_PASSWORD))
        through_failure_then_success(operator, peers, "oauth",
                                     lambda: setattr(peers.oauth, "accept", False),
                                     lambda: setattr(peers.oauth, "accept", True))
        through_failure_then_success(  # Entra ID does not know the certificate, then does
            operator, peers, "certapp", lambda: provider.jwt.certificates.pop(APP_ID, None),
            lambda: provider.jwt.certificates.update({APP_ID: CERTIFICATE.cert}))
        through_failure_then_success(  # Google: no domain-wide delegation, then the scope
            operator, peers, "svc", ACCOUNT.delegated.clear,
            lambda: ACCOUNT.delegated.add(GOOGLE_MAIL))
        # the provider revokes everything: Not granted (held), then a new sign-in
        provider.revoke_user()
        provider.expire_access_tokens()
        operator.switch_to("oauth")  # a new upstream: the open, authenticated session goes
        queue_id = operator.send("after-revoke")
        wait_for(lambda: "Not granted" in daemon.log_text(), what="not granted")
        operator.look_at_everything(queue_id)
        sign_in(operator, provider)
        operator.cli("queue", "retry", queue_id)
        wait_for(lambda: "after-revoke" in peers.delivered(), what="delivery after sign-in")
        operator.look_at_everything(None)
        broken_copies(operator)
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    operator.seen.append(("the daemon's log (debug)", daemon.log_text()))

    # the secrets were really used: refused first, then accepted, on the wire
    assert peers.auth.logins.count("sys") >= 4
    assert any(b"PASS " + POP_PASSWORD.encode() in line for line in peers.pop.received)
    assert len(peers.oauth.tokens) >= 3
    assert sorted(peers.delivered()) == sorted(
        ["via-smtp", "via-login", "via-pop", "via-oauth", "via-certapp", "via-svc",
         "after-revoke"])
    assert provider.count("client_credentials invalid_client") >= 1  # refused, then
    assert provider.count("client_credentials ok") >= 1  # accepted
    assert "Domain-wide delegation" in daemon.log_text()
    log = daemon.log_text()
    for evidence in ("535", "Authentication failed", "Not granted", "status=sent"):
        assert evidence in log, evidence

    known: dict[str, dict[str, str]] = {
        "SMTP password": forms(SMTP_PASSWORD, "sys"),
        "POP password": forms(POP_PASSWORD),
        "OAuth client secret": forms(CLIENT_SECRET),
        "admin token": forms(ADMIN_TOKEN, "admin"),
    }
    for n, token in enumerate([*provider.issued(), *peers.oauth.tokens]):
        known[f"OAuth token or code #{n}"] = forms(token, USER)
    keys = {"client certificate key": CERTIFICATE.key_pem().decode(),
            "service account key": ACCOUNT.json_key("")["private_key"]}
    for name, pem in keys.items():
        for n, line in enumerate(pem.splitlines()[1:-1]):
            known[f"{name} line {n}"] = {"as is": line}
    assert len(provider.jwt.raw) >= 4
    for n, assertion in enumerate(provider.jwt.raw):
        known[f"signed assertion #{n}"] = {**forms(assertion),
                                           "signature": assertion.rsplit(".", 1)[1]}
    assert len(known) > 6
    leaks = [f"{name} ({form}) in {where}"
             for where, text in operator.seen
             for name, shapes in known.items()
             for form, shape in shapes.items()
             if len(shape) >= 8 and shape in text]
    assert leaks == [], "\n".join(leaks)
    shapes = sum(len(v) for v in known.values())
    print(f"\nscanned {len(operator.seen)} outputs ({sum(len(t) for _, t in operator.seen)} "
          f"characters) for {len(known)} secrets in {shapes} shapes: no leak")
    assert len(operator.seen) > 100
    assert "Traceback" not in log
