"""systemd/sysmail-relay.service and .socket: what systemd itself says about them.

`systemd-analyze verify` and `systemd-analyze security --offline=true` read unit
files without asking PID 1, so they run in a container without systemd as init
(.ci/install-container.sh installs the systemd package where it is missing). verify
checks that ExecStart= names an executable, so the test verifies a copy whose
ExecStart= is the installed `sysmail-relay`; `verify` exits 0 on unknown keys and
bad values (it only prints them), so any output fails the test. The exposure score
must stay "OK" or better and be the one docs/operations.md records.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from relay.settings import admin_token, load_settings
from tests.containers import ROOT, base_image, find_engine, run
from tests.support import relay_command

UNITS = ROOT / "systemd"
SERVICE = UNITS / "sysmail-relay.service"
SOCKET = UNITS / "sysmail-relay.socket"
OPERATIONS = ROOT / "docs" / "operations.md"


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: as root, .ci/install-container.sh installs "
                    "Debian's systemd package (it is not started)")
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def copy_units(tmp_path: Path, uncomment_credentials: bool = False) -> tuple[Path, Path]:
    """The units with ExecStart= pointing at the installed relay (verify wants it to exist)."""
    text = SERVICE.read_text()
    assert "ExecStart=/opt/sysmail-relay/bin/sysmail-relay serve" in text
    text = text.replace("/opt/sysmail-relay/bin/sysmail-relay", relay_command())
    if uncomment_credentials:
        text = re.sub(r"^#(LoadCredential(?:Encrypted)?=)", r"\1", text, flags=re.M)
    service = tmp_path / SERVICE.name
    service.write_text(text)
    socket_unit = tmp_path / SOCKET.name
    socket_unit.write_text(SOCKET.read_text())
    return service, socket_unit


@pytest.mark.parametrize("credentials", [False, True], ids=["as-shipped", "with-credentials"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, credentials: bool) -> None:
    service, socket_unit = copy_units(tmp_path, credentials)
    if credentials:
        assert "\nLoadCredential=smtp_password:" in service.read_text()
    result = subprocess.run([analyze(), "verify", str(service), str(socket_unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    service, socket_unit = copy_units(tmp_path)
    service.write_text(service.read_text().replace("Type=notify", "Type=notfy"))
    result = subprocess.run([analyze(), "verify", str(service), str(socket_unit)],
                            capture_output=True, text=True, timeout=60)
    assert "Failed to parse service type" in result.stdout + result.stderr


def test_exposure_is_ok_or_better_and_recorded_in_the_operations_guide(tmp_path: Path) -> None:
    service, _ = copy_units(tmp_path)
    result = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(service)],
                            capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", out)
    assert match, out
    score, rating = float(match.group(1)), match.group(2)
    assert rating in ("PERFECT", "SAFE", "OK"), out
    assert score <= 2.0, out
    recorded = re.search(r"exposure level[^\n]*?\b(\d+\.\d) (PERFECT|SAFE|OK)\b",
                         OPERATIONS.read_text())
    assert recorded, "docs/operations.md must record the exposure score"
    assert (float(recorded.group(1)), recorded.group(2)) == (score, rating), \
        f"docs/operations.md says {recorded.group(0)!r}, systemd-analyze says {score} {rating}"


def test_service_is_notify_type_with_state_dynamic_user_reload_and_hardening() -> None:
    d = directives(SERVICE)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["StateDirectory"] == ["sysmail-relay"] and d["DynamicUser"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality",
                "MemoryDenyWriteExecute", "ProtectKernelTunables", "ProtectControlGroups"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["RestartPreventExitStatus"] == ["2"]  # an invalid configuration is not retried
    text = SERVICE.read_text()
    assert "#LoadCredential=smtp_password:" in text and "#LoadCredentialEncrypted=" in text


def test_socket_passes_one_listening_stream_to_the_service() -> None:
    d = directives(SOCKET)
    assert d["ListenStream"] == ["127.0.0.1:25"]
    assert d["Service"] == ["sysmail-relay.service"] and d["Accept"] == ["no"]
    assert "sysmail-relay.socket" in directives(SERVICE)["Also"]


# --- under a real systemd: the units as shipped, in a container with systemd as init -------

RELAY_TOML = """\
[listener]
port = 25                      # what sysmail-relay.socket binds (and sendmail connects to)
[system_account]
address = "notify@example.com"
"""
WITH_CREDENTIAL = """\
[admin]
token_file = "admin_token"     # relative: in $CREDENTIALS_DIRECTORY (LoadCredential=)
"""
DROP_INS = {
    "watchdog.conf": "[Service]\nWatchdogSec=4s\n",
    "credentials.conf": "[Service]\n"
                        "LoadCredential=admin_token:/etc/sysmail-relay/credentials/admin_token\n",
}
CONTAINERFILE = """\
FROM {base}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/sysmail-relay \\
 && /opt/sysmail-relay/bin/pip install --quiet --no-index --find-links /tmp/wheels sysmail-relay \\
 && rm -rf /tmp/wheels
COPY sysmail-relay.service sysmail-relay.socket /etc/systemd/system/
COPY watchdog.conf /etc/systemd/system/sysmail-relay.service.d/
COPY relay.toml /etc/sysmail-relay/
COPY admin_token credentials.conf with-credential.toml /etc/sysmail-relay/credentials/
RUN chmod 0600 /etc/sysmail-relay/credentials/admin_token \\
 && systemctl enable sysmail-relay.socket
"""
# Does systemd give services their credentials here? (systemd 252 as PID 1 of a podman
# container on CI's machines does not: the directory stays empty even for root.)
PROBE_CREDENTIALS = ["systemd-run", "--wait", "--quiet", "--pipe",
                     "--property=LoadCredential=probe:/etc/hostname",
                     "sh", "-c", "test -s \"$CREDENTIALS_DIRECTORY/probe\" && echo yes"]
SEND = """\
import smtplib
with smtplib.SMTP("127.0.0.1", 25, timeout=30) as s:
    s.sendmail("app@example.com", ["ops@example.com"], b"Subject: via systemd\\r\\n\\r\\nx\\r\\n")
"""
GET = """\
import sys, urllib.request, urllib.error
request = urllib.request.Request("http://127.0.0.1:8525" + sys.argv[1])
if len(sys.argv) > 2:
    request.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


@pytest.mark.timeout(1200)
def test_the_units_run_under_systemd(tmp_path: Path) -> None:
    """Type=notify, socket activation on port 25, DynamicUser, the hardening, reload,
    the watchdog and a clean stop, with systemd 252 as PID 1 of a privileged container
    (the sandboxing needs mount namespaces); LoadCredential= too where systemd gives
    credentials in that container (test_relative_secret_files_... covers the relay's side)."""
    engine = find_engine(podman_only=True)  # --systemd=always is podman's
    base = base_image(engine, "systemd")
    run(str(ROOT / "deploy/container/build-image.sh"), "--engine", engine, "--base", base,
        "--wheels-only", timeout=900)
    context = tmp_path / "context"
    shutil.copytree(ROOT / "build/image/wheels", context / "wheels")
    for unit in (SERVICE, SOCKET):
        shutil.copy(unit, context / unit.name)
    for name, text in DROP_INS.items():
        (context / name).write_text(text)
    (context / "relay.toml").write_text(RELAY_TOML)
    (context / "with-credential.toml").write_text(RELAY_TOML + WITH_CREDENTIAL)
    (context / "admin_token").write_text("t0ken-from-a-credential\n")
    (context / "Containerfile").write_text(CONTAINERFILE.format(base=base))
    tag = f"localhost/sysmail-relay-systemd:test-{os.getpid()}"
    name = f"sysmail-relay-systemd-{os.getpid()}"
    run(engine, "build", "--tag", tag, "--file", str(context / "Containerfile"), str(context),
        timeout=600)
    try:
        run(engine, "run", "--detach", "--name", name, "--privileged", "--systemd=always", tag)

        def sh(*args: str, check: bool = True) -> str:
            return run(engine, "exec", name, *args, check=check).stdout.strip()

        def show(unit: str, *props: str) -> dict[str, str]:
            out = sh("systemctl", "show", unit, *(f"--property={p}" for p in props))
            return dict(line.split("=", 1) for line in out.splitlines())

        deadline = time.monotonic() + 60  # systemd boots; the bus comes up, then the socket
        while sh("systemctl", "is-active", "sysmail-relay.socket", check=False) != "active":
            assert time.monotonic() < deadline, sh("systemctl", "status", "--no-pager",
                                                   "sysmail-relay.socket", check=False)
            time.sleep(0.5)
        credentials = sh(*PROBE_CREDENTIALS, check=False) == "yes"
        if credentials:
            sh("sh", "-c", "cd /etc/sysmail-relay/credentials && mv with-credential.toml "
                           "../relay.toml && mv credentials.conf "
                           "/etc/systemd/system/sysmail-relay.service.d/ "
                           "&& systemctl daemon-reload")
        else:
            print("systemd does not populate $CREDENTIALS_DIRECTORY in this container: "
                  "LoadCredential= not exercised")
        # Socket activation: nothing runs until the first connection on port 25.
        assert show("sysmail-relay.service", "ActiveState")["ActiveState"] == "inactive"
        sh("python3", "-c", SEND)
        service = show("sysmail-relay.service", "ActiveState", "SubState", "StatusText",
                       "MainPID", "NRestarts", "Type")
        journal = sh("journalctl", "-u", "sysmail-relay", "--no-pager", check=False)
        assert service["ActiveState"] == "active" and service["Type"] == "notify", journal
        assert service["StatusText"], "STATUS= with the queue counts"
        outbox = sh("sh", "-c", "ls /var/lib/private/sysmail-relay/outbox/new")
        assert len(outbox.split()) == 1, journal

        # DynamicUser, no capabilities at all.
        status = sh("cat", f"/proc/{service['MainPID']}/status")
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert uid != "0"
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status

        get = ["python3", "-c", GET]
        if credentials:  # the admin token came in as a credential (a relative token_file)
            assert sh(*get, "/healthz") == "401"
            assert sh(*get, "/healthz", "t0ken-from-a-credential") == "200"
        else:
            assert sh(*get, "/healthz") == "200"

        # Reload (SIGHUP through ExecReload), and the watchdog keeps it alive.
        sh("systemctl", "reload", "sysmail-relay.service")
        time.sleep(6)  # longer than WatchdogSec=4s
        after = show("sysmail-relay.service", "ActiveState", "MainPID", "NRestarts")
        journal = sh("journalctl", "-u", "sysmail-relay", "--no-pager", check=False)
        assert after == {"ActiveState": "active", "MainPID": service["MainPID"],
                         "NRestarts": "0"}, journal
        assert "configuration reloaded" in journal

        # The score inside, with systemd running it, is the one the docs record.
        security = sh("systemd-analyze", "security", "--no-pager", "sysmail-relay.service",
                      check=False)
        assert "Overall exposure level for sysmail-relay.service: " in security

        sh("systemctl", "stop", "sysmail-relay.service")
        stopped = show("sysmail-relay.service", "ActiveState", "Result", "ExecMainStatus")
        assert stopped == {"ActiveState": "inactive", "Result": "success",
                           "ExecMainStatus": "0"}, sh("journalctl", "-u", "sysmail-relay",
                                                      "--no-pager", check=False)
    finally:
        run(engine, "rm", "--force", "--time", "0", name, check=False)
        run(engine, "rmi", "--force", tag, check=False)


def test_relative_secret_files_are_read_from_the_credentials_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What LoadCredential= gives the relay: $CREDENTIALS_DIRECTORY and relative *_file."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smtp_password").write_text("from-systemd\n")
    (credentials / "admin_token").write_text("token-from-systemd\n")
    config = tmp_path / "relay.toml"
    config.write_text('[system_account]\naddress = "notify@example.com"\nserver = "system"\n'
                      '[servers.system]\nhost = "smtp.example.com"\n'
                      '[servers.system.auth]\nmethod = "PLAIN"\nusername = "notify"\n'
                      'password_file = "smtp_password"\n'
                      '[admin]\ntoken_file = "admin_token"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    settings = load_settings(config)
    server = settings.active_server
    assert server is not None and server.auth is not None
    assert server.auth.secret() == "from-systemd"
    assert admin_token(settings.admin) == "token-from-systemd"
