"""The container image, really built and run: a message through the published port
reaches the outbox in the state volume, the health check answers, SIGTERM to PID 1
stops it with exit 0.

The engine is podman (or docker with a running daemon); .ci/install-container.sh
installs and configures podman. No registry is reachable on CI's machines, so the
base image is made locally, once, with debootstrap (Debian 12 minbase with python3,
about a minute) and kept: as an image in the engine's store, and as a tarball under
/var/tmp/sysmail-relay-test/ from which it is re-imported in seconds. Set
RELAY_TEST_CONTAINER_BASE to an image name (e.g. python:3.12-slim) to use that
instead. The test is skipped only when no container engine can run here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import smtplib
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from email.utils import parseaddr
from pathlib import Path

import pytest

from relay.settings import load_settings
from tests.containers import ROOT, base_image, find_engine, run
from tests.support import free_port

UID = 2525  # the image's user relay (Dockerfile)
PRIVATE_NETS = '["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]'


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[str, str, dict[str, float]]]:
    engine = find_engine()
    times: dict[str, float] = {}
    started = time.monotonic()
    base = base_image(engine)
    times["base image"] = time.monotonic() - started
    tag = f"localhost/sysmail-relay:test-{os.getpid()}"
    started = time.monotonic()
    run(str(ROOT / "deploy/container/build-image.sh"), "--engine", engine, "--base", base,
        "--tag", tag, timeout=900)
    times["build"] = time.monotonic() - started
    yield engine, tag, times
    run(engine, "rmi", "--force", tag, check=False)


@contextlib.contextmanager
def container(engine: str, *args: str) -> Iterator[str]:
    name = f"sysmail-relay-test-{os.getpid()}-{time.monotonic_ns()}"
    run(engine, "run", "--detach", "--name", name, *args, timeout=120)
    try:
        yield name
    finally:
        run(engine, "rm", "--force", "--time", "0", name, check=False)
        if run(engine, "container", "exists", name, check=False).returncode == 0:
            run(engine, "rm", "--force", name, check=False)


def wait_for_smtp(port: int, engine: str, name: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                smtp.noop()
                return
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                logs = run(engine, "logs", name, check=False)
                raise AssertionError("the relay in the container did not answer on its "
                                     f"published port:\n{logs.stdout}{logs.stderr}") from None
            time.sleep(0.2)


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(1200)
def test_image_relays_a_message_into_the_state_volume_and_stops_on_sigterm(
        image: tuple[str, str, dict[str, float]], tmp_path: Path) -> None:
    engine, tag, times = image
    config = json.loads(run(engine, "image", "inspect", "--format", "{{json .Config}}", tag).stdout)
    assert config["User"] == f"{UID}:{UID}", "the image must not run as root"
    assert "/var/lib/sysmail-relay" in config["Volumes"]
    health = json.loads(run(engine, "image", "inspect", "--format",
                            "{{json .Config.Healthcheck}}", tag).stdout)
    assert health["Test"][-1] == "/healthz", health

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, UID, UID)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "admin_token").write_text("s3cret-admin-token\n")
    os.chmod(secrets / "admin_token", 0o444)
    (tmp_path / "relay.toml").write_text(
        '[system_account]\naddress = "from-file@example.com"\n\n'
        '[admin]\nhost = "0.0.0.0"\ntoken_file = "/run/secrets/admin_token"\n\n'
        '[queue]\nretry_initial = "1s"\nretry_max = "2s"\n')
    smtp_port, admin_port = free_port(), free_port()

    started = time.monotonic()
    with container(
            engine,
            # podman schedules health checks with systemd timers, absent here: run by hand
            *(["--health-interval", "disable"] if "podman" in engine else []),
            # as deploy/ runs it: read-only root, no capabilities, no privilege gain
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "-p", f"127.0.0.1:{smtp_port}:2525", "-p", f"127.0.0.1:{admin_port}:8525",
            "-v", f"{state}:/var/lib/sysmail-relay",
            "-v", f"{tmp_path / 'relay.toml'}:/etc/sysmail-relay/relay.toml:ro",
            "-v", f"{secrets}:/run/secrets:ro",
            "-e", "RELAY_SYSTEM_ACCOUNT__ADDRESS=notify@example.com",  # env over the file
            "-e", f"RELAY_LISTENER__ALLOWED_NETWORKS={PRIVATE_NETS}",
            tag) as name:
        wait_for_smtp(smtp_port, engine, name)
        times["start"] = time.monotonic() - started

        # The daemon itself is PID 1 (no init): SIGTERM below reaches it directly.
        cmdline = run(engine, "exec", name, "cat", "/proc/1/cmdline").stdout
        assert "sysmail-relay" in cmdline and "serve" in cmdline, cmdline
        assert run(engine, "exec", name, "id", "-u").stdout.strip() == str(UID)

        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
            smtp.sendmail("billing@app.example.com", ["user@example.com"],
                          b"From: Billing <billing@app.example.com>\r\nTo: user@example.com\r\n"
                          b"Subject: Invoice\r\n\r\nThrough the container.\r\n")
        new = state / "outbox" / "new"
        deadline = time.monotonic() + 30
        while not (new.is_dir() and any(new.iterdir())):
            assert time.monotonic() < deadline, run(engine, "logs", name).stderr
            time.sleep(0.1)
        (delivered,) = new.iterdir()
        msg = message_from_bytes(delivered.read_bytes())
        assert msg["Return-Path"] == "<notify@example.com>"
        assert parseaddr(msg["From"])[1] == "notify@example.com"
        assert "Through the container." in msg.get_payload()
        assert delivered.stat().st_uid == UID

        # The health check the image declares, with the token from the secret file.
        health = run(engine, "healthcheck", "run", name, check=False) if "podman" in engine \
            else run(engine, "exec", name, "sysmail-relay-healthcheck", check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        ready = run(engine, "exec", name, "sysmail-relay-healthcheck", "/readyz", check=False)
        assert ready.returncode == 0 and "ready" in ready.stdout, ready.stdout + ready.stderr
        # The fast form deploy/kubernetes/ uses for its probes: no configuration read.
        fast = run(engine, "exec", name, "sysmail-relay-healthcheck", "/readyz", "--url",
                   "http://127.0.0.1:8525", "--token-file", "/run/secrets/admin_token",
                   check=False)
        assert fast.returncode == 0 and "ready" in fast.stdout, fast.stdout + fast.stderr
        wrong = run(engine, "exec", name, "sysmail-relay-healthcheck", "--url",
                    "http://127.0.0.1:8525", check=False)
        assert wrong.returncode == 1 and "401" in wrong.stdout, wrong.stdout
        base = f"http://127.0.0.1:{admin_port}"
        assert http_get(f"{base}/healthz")[0] == 401
        code, metrics = http_get(f"{base}/metrics", "s3cret-admin-token")
        assert code == 200 and "relay_messages_received_total 1.0" in metrics

        started = time.monotonic()
        run(engine, "kill", "--signal", "TERM", name)
        code_text = run(engine, "wait", name, timeout=60).stdout.strip()
        times["stop"] = time.monotonic() - started
        shown = run(engine, "logs", name)
        logs = shown.stdout + shown.stderr
        assert code_text == "0", f"exit {code_text} after SIGTERM:\n{logs}"
        assert "stopped" in logs
    print("container test times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


# --- the deploy/ examples (no engine needed) -----------------------------------------------

def _with_stand_in_secrets(text: str, tmp_path: Path) -> str:
    for secret in set(re.findall(r"(/run/secrets/[\w./-]+)", text)):
        stand_in = tmp_path / Path(secret).name
        stand_in.write_text("example-secret\n")
        text = text.replace(secret, str(stand_in))
    return text


def test_kubernetes_sidecar_example_is_consistent(tmp_path: Path) -> None:
    text = (ROOT / "deploy/kubernetes/sidecar.yaml").read_text()
    block = re.search(r"relay\.toml: \|\n((?:    .*\n|\n)+)", text)
    assert block, "the ConfigMap holds relay.toml"
    config = tmp_path / "relay.toml"
    config.write_text(_with_stand_in_secrets(textwrap.dedent(block.group(1)), tmp_path))
    settings = load_settings(config)
    assert settings.listener.host == "127.0.0.1"  # pod-local
    assert settings.admin.host == "0.0.0.0" and settings.admin.token_file is not None
    token_file = re.search(r'token_file = "([^"]+)"', block.group(1))
    assert token_file
    for path in ("/healthz", "/readyz"):
        assert f'"sysmail-relay-healthcheck", "{path}", "--url", "http://127.0.0.1:8525",' in text
    assert text.count(f'"--token-file", "{token_file.group(1)}"') == 3
    assert f"mountPath: {Path(token_file.group(1)).parent}\n" in text  # the Secret's volume
    for annotation in ('prometheus.io/scrape: "true"', 'prometheus.io/port: "8525"',
                       'prometheus.io/path: "/metrics"'):
        assert annotation in text
    assert f"runAsUser: {UID}" in text and f"fsGroup: {UID}" in text
    assert "mountPath: /var/lib/sysmail-relay" in text and "volumeClaimTemplates" in text


def test_compose_example_environment_is_a_valid_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "deploy/docker-compose.yml").read_text()
    env = dict(re.findall(r"^ {6}(RELAY_\w+): (.+)$", text, flags=re.M))
    assert "RELAY_LISTENER__ALLOWED_NETWORKS" in env
    for key, value in env.items():
        value = value.strip()
        if value[:1] in "'\"":
            value = value[1:-1]
        monkeypatch.setenv(key, _with_stand_in_secrets(value, tmp_path))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    settings = load_settings(None)
    assert settings.system_account.address == "notify@example.com"
    assert settings.active_server is not None and settings.active_server.auth is not None
    subnet = re.search(r"subnet: (\S+)", text)
    assert subnet and any(str(n) == subnet.group(1) for n in settings.listener.allowed_networks)
