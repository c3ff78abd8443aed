"""deploy/kubernetes/'s fleet: the relays' configuration is valid and points at the Redis
Service with the password the Redis Deployment requires (kubernetes-validate checks the
manifests themselves: tests/test_docker.py)."""

from __future__ import annotations

import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.settings import validate

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy/kubernetes"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def kind(found: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    (doc,) = (d for d in found if d["kind"] == wanted)
    return doc


@pytest.mark.parametrize("manifest", ["fleet-sidecar.yaml", "fleet-relay.yaml"])
def test_the_relays_find_the_fleets_redis_with_its_password(manifest: str,
                                                            tmp_path: Path) -> None:
    redis = docs("fleet-redis.yaml")
    service = kind(redis, "Service")
    secret = kind(redis, "Secret")
    valkey = kind(redis, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    (password_env,) = valkey["env"]
    assert "$(REDIS_PASSWORD)" in valkey["args"]
    key_ref = password_env["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"]

    found = docs(manifest)
    text = kind(found, "ConfigMap")["data"]["relay.toml"]
    raw = tomllib.loads(text)
    url = urllib.parse.urlsplit(raw["fleet"]["url"])
    assert (url.hostname, url.port) == (service["metadata"]["name"],
                                        service["spec"]["ports"][0]["port"])

    # the password file is the Secret's key, mounted where the configuration reads it
    pod = kind(found, "StatefulSet")["spec"]["template"]["spec"]
    relay = (pod.get("initContainers") or pod["containers"])[0]
    path = Path(raw["fleet"]["password_file"])
    (mount,) = (m for m in relay["volumeMounts"] if m["mountPath"] == str(path.parent))
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert path.name == key_ref["key"] in [i["key"] for i in volume["secret"]["items"]]

    # and the whole configuration is valid, its secrets where the pod has them
    secrets = tmp_path / "secrets"
    for name in ("sysmail-relay/smtp_password", "sysmail-relay/admin_token",
                 "sysmail-relay-fleet/redis_password", "sysmail-relay-fleet/token_key"):
        (secrets / name).parent.mkdir(parents=True, exist_ok=True)
        (secrets / name).write_text("ab" * 32 + "\n")
    raw = tomllib.loads(text.replace("/run/secrets/", f"{secrets}/"))
    settings = validate({**raw, "state_dir": str(tmp_path / "state")}, manifest)
    assert settings.fleet is not None and settings.active_server is not None
    assert settings.fleet.token_key_file is not None
    assert settings.fleet.token_key_file.name in [i["path"] for i in volume["secret"]["items"]]
    assert settings.active_server.rate_limit is not None
