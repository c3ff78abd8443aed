"""Docker and Kubernetes for real: the image built with `docker build` and run as the pod
in deploy/kubernetes/sidecar.yaml runs it, the manifests validated against the
Kubernetes version they target, the compose file checked by compose itself.

The engine is Debian's docker.io, started by the test (tests/dockerd.py: its own data
root, socket and containerd, no bridge, no iptables) and stopped after. The base image
is the Debian 12 one tests/containers.py makes with debootstrap (nothing is pulled),
imported with `docker import`; deploy/container/build-image.sh builds the image once
for the module with `docker build`.

The pod: the relay container gets the sidecar's arguments, environment, security
context (user 2525, read-only root, no capabilities, no privilege gain), the ConfigMap's
relay.toml, the Secret's files and a volume for its state, and `--network none`; the
application container joins it with `--network container:<relay>`, so both see only
the relay container's loopback, as containers of one pod share theirs. The manifest's
own probe commands decide when the relay is up, and Docker's run of the image's
HEALTHCHECK must find it healthy. Only the upstream differs: there is
no network, so `system_account.server = "local"` (the outbox on the state volume)
stands in for smtp.example.com.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .containers import ROOT, base_image, run
from .dockerd import Dockerd, private_dockerd

# deploy/kubernetes/ targets Kubernetes 1.29 and later: the relay is a native sidecar
# (an init container with restartPolicy: Always, on by default since 1.29).
TARGET_KUBERNETES = "1.29"
UID = 2525  # the image's user relay (Dockerfile)

APP_SCRIPT = """
import os, smtplib, socket
print("interfaces", ",".join(sorted(name for _, name in socket.if_nameindex())))
message = (b"From: Billing <billing@app.example.com>\\r\\nTo: user@example.com\\r\\n"
           b"Subject: Invoice\\r\\n\\r\\nSent from the app container.\\r\\n")
with smtplib.SMTP(os.environ["SMTP_HOST"], int(os.environ["SMTP_PORT"]), timeout=30) as smtp:
    refused = smtp.sendmail("billing@app.example.com", ["user@example.com"], message)
print("refused", refused)
"""


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    with private_dockerd(tmp_path_factory.mktemp("dockerd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def images(docker: Dockerd) -> tuple[str, str]:
    """(base, relay): the debootstrap base imported, the relay image built once."""
    started = time.monotonic()
    base = base_image(docker.cli)
    imported = time.monotonic() - started
    tag = "localhost/sysmail-relay:docker-test"
    started = time.monotonic()
    run(str(ROOT / "deploy/container/build-image.sh"), "--engine", docker.cli, "--base", base,
        "--tag", tag, timeout=900)
    print(f"dockerd {docker.version} ({docker.storage_driver}): base image {imported:.1f} s, "
          f"docker build {time.monotonic() - started:.1f} s")
    return base, tag


def sidecar_manifest() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(ConfigMap, the relay's container, the pod spec) from deploy/kubernetes/sidecar.yaml."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text()))
    (configmap,) = (d for d in docs if d["kind"] == "ConfigMap")
    (statefulset,) = (d for d in docs if d["kind"] == "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (relay,) = (c for c in pod["initContainers"] if c["name"] == "sysmail-relay")
    assert relay["restartPolicy"] == "Always", "the relay is a native sidecar"
    return configmap, relay, pod


def security_args(context: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """A container's securityContext as `docker run` options."""
    args = ["--user", f"{context['runAsUser']}:{context['runAsGroup']}",
            "--group-add", str(pod["securityContext"]["fsGroup"])] \
        if "runAsUser" in context else []
    if context.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for capability in context.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability]
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def wait_for_probe(docker: Dockerd, name: str, probe: dict[str, Any]) -> None:
    """Runs the probe's exec command as the kubelet would until it succeeds."""
    budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    deadline = time.monotonic() + budget
    while True:
        result = run(docker.cli, "exec", name, *probe["exec"]["command"], check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            logs = run(docker.cli, "logs", name, check=False)
            raise AssertionError(f"the startup probe still fails after {budget} s: "
                                 f"{result.stdout}{result.stderr}\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)


def wait_until_healthy(docker: Dockerd, name: str, within: float = 60) -> None:
    """Docker's own run of the image's HEALTHCHECK (it finds the token in the config)."""
    deadline = time.monotonic() + within
    while True:
        health = json.loads(run(docker.cli, "inspect", "--format", "{{json .State.Health}}",
                                name).stdout)
        if health["Status"] == "healthy":
            return
        if health["Status"] == "unhealthy" or time.monotonic() > deadline:
            raise AssertionError(f"Docker finds the relay {health['Status']}: {health['Log']}")
        time.sleep(0.5)


@pytest.mark.timeout(1200)
def test_sidecar_pod_relays_over_its_loopback_into_the_state_volume(
        docker: Dockerd, images: tuple[str, str], tmp_path: Path) -> None:
    base, tag = images
    configmap, relay, pod = sidecar_manifest()
    (app,) = pod["containers"]
    mounts = {m["name"]: m for m in relay["volumeMounts"]}

    config = tmp_path / "config"  # the ConfigMap's files
    config.mkdir()
    for key, value in configmap["data"].items():
        (config / key).write_text(value)
    secrets = tmp_path / "secrets"  # the Secret, as `defaultMode` and fsGroup make it
    secrets.mkdir()
    (secret_volume,) = (v for v in pod["volumes"] if v["name"] == "secrets")
    for key in ("smtp_password", "admin_token"):
        (secrets / key).write_text(f"stand-in {key}\n")
        os.chown(secrets / key, 0, pod["securityContext"]["fsGroup"])
        (secrets / key).chmod(secret_volume["secret"]["defaultMode"])

    with contextlib.ExitStack() as cleanup:
        volume = run(docker.cli, "volume", "create").stdout.strip()
        cleanup.callback(run, docker.cli, "volume", "rm", "--force", volume, check=False)
        name = f"sysmail-relay-pod-{os.getpid()}"
        cleanup.callback(run, docker.cli, "rm", "--force", name, check=False)
        env = [f"--env={e['name']}={e['value']}" for e in relay.get("env", [])]
        run(docker.cli, "run", "--detach", "--name", name, "--network", "none",
            *security_args(relay["securityContext"], pod), *env,
            # no network here: the built-in outbox stands in for smtp.example.com
            "--env", "RELAY_SYSTEM_ACCOUNT__SERVER=local",
            "--volume", f"{volume}:{mounts['state']['mountPath']}",
            "--volume", f"{config}:{mounts['config']['mountPath']}:ro",
            "--volume", f"{secrets}:{mounts['secrets']['mountPath']}:ro",
            "--tmpfs", mounts["tmp"]["mountPath"],
            "--stop-timeout", str(pod["terminationGracePeriodSeconds"]),
            # Kubernetes ignores the image's HEALTHCHECK; Docker (and compose's
            # service_healthy) runs it: every second here instead of every 30 s
            "--health-interval", "1s",
            tag, *relay["args"])

        wait_for_probe(docker, name, relay["startupProbe"])
        for probe in ("livenessProbe", "readinessProbe"):
            result = run(docker.cli, "exec", name, *relay[probe]["exec"]["command"], check=False)
            assert result.returncode == 0, f"{probe}: {result.stdout}{result.stderr}"
        wait_until_healthy(docker, name)

        # The application: another image, its env from the manifest, the relay's loopback.
        sent = run(docker.cli, "run", "--rm", "--network", f"container:{name}",
                   *security_args(app["securityContext"], pod),
                   *[f"--env={e['name']}={e['value']}" for e in app["env"]],
                   "--entrypoint", "python3", base, "-c", APP_SCRIPT, timeout=120)
        assert "interfaces lo\n" in sent.stdout, sent.stdout  # only the shared loopback
        assert "refused {}\n" in sent.stdout, sent.stdout + sent.stderr

        state = Path(run(docker.cli, "volume", "inspect", "--format", "{{.Mountpoint}}",
                         volume).stdout.strip())
        new = state / "outbox" / "new"
        deadline = time.monotonic() + 30
        while not (new.is_dir() and any(new.iterdir())):
            assert time.monotonic() < deadline, run(docker.cli, "logs", name).stderr
            time.sleep(0.1)
        (delivered,) = new.iterdir()
        assert delivered.stat().st_uid == UID
        msg = message_from_bytes(delivered.read_bytes())
        assert msg["Return-Path"] == "<notify@example.com>"  # the ConfigMap's address
        assert parseaddr(msg["From"]) == ("Billing", "notify@example.com")
        assert [a for _, a in getaddresses(msg.get_all("Reply-To", []))] \
            == ["billing@app.example.com"]
        assert "Sent from the app container." in msg.get_payload()

        # Pod deletion: SIGTERM, the grace period, then the relay has exited by itself.
        run(docker.cli, "stop", name, timeout=120)
        state_text = run(docker.cli, "inspect", "--format",
                         "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout.split()
        logs = run(docker.cli, "logs", name)
        assert state_text == ["0", "false"], logs.stdout + logs.stderr
        assert "stopped" in logs.stdout + logs.stderr


# --- the deploy/ files, checked by the tools that will read them ---------------------------

def test_kubernetes_manifests_are_valid_for_the_kubernetes_they_target() -> None:
    manifests = sorted((ROOT / "deploy/kubernetes").glob("*.yaml"))
    assert manifests
    latest = kubernetes_validate.latest_version()
    for path in manifests:
        text = path.read_text()
        assert f"Kubernetes >= {TARGET_KUBERNETES}" in text, f"{path.name} names its target"
        for doc in yaml.safe_load_all(text):
            for version in (TARGET_KUBERNETES, latest):
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{path.name}: {doc['kind']} is not valid for Kubernetes "
                                f"{version}: {'.'.join(map(str, e.path))}: {e.message}")

    # Strict: a misspelt field is an error, not ignored (what `kubectl apply` would do).
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text()))
    (statefulset,) = (d for d in docs if d["kind"] == "StatefulSet")
    context = statefulset["spec"]["template"]["spec"]["initContainers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(statefulset, TARGET_KUBERNETES, strict=True)


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) if the docker CLI has it, else docker-compose (v1)."""
    for docker in ("/usr/bin/docker", shutil.which("docker")):
        if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                     check=False).returncode == 0:
            return [docker, "compose"]
    if found := shutil.which("docker-compose"):
        return [found]
    pytest.skip("neither `docker compose` nor docker-compose is installed; as root, "
                ".ci/install-container.sh installs Debian's docker-compose")


def test_compose_file_is_valid_for_compose_and_a_misspelt_key_is_refused(
        tmp_path: Path) -> None:
    compose = compose_command()
    source = ROOT / "deploy/docker-compose.yml"
    shown = run(*compose, "--file", str(source), "config", timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    model = yaml.safe_load(shown.stdout)
    relay = model["services"]["relay"]
    assert relay["image"] == "localhost/sysmail-relay:latest"  # build-image.sh's default tag
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    # compose v1 prints a volume as "SOURCE:TARGET:MODE", v2 as a mapping
    assert [v for v in relay["volumes"] if v == "relay-state:/var/lib/sysmail-relay:rw" or
            (v["source"], v["target"]) == ("relay-state", "/var/lib/sysmail-relay")]
    assert [s["source"] for s in relay["secrets"]] == ["smtp_password"]
    assert model["services"]["app"]["depends_on"]["relay"]["condition"] == "service_healthy"
    subnet = model["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert subnet in json.loads(relay["environment"]["RELAY_LISTENER__ALLOWED_NETWORKS"])

    misspelt = tmp_path / "docker-compose.yml"
    misspelt.write_text(source.read_text().replace("    cap_drop:", "    cap_dorp:"))
    refused = run(*compose, "--file", str(misspelt), "config", timeout=60, check=False)
    assert refused.returncode != 0 and "cap_dorp" in refused.stderr, refused.stderr
