#!/opt/sysmail-relay/bin/python3
"""The container's health check: GET the admin listener's /healthz (or the path given).

    sysmail-relay-healthcheck [/healthz | /readyz] [--url http://127.0.0.1:8525]
                              [--token-file /run/secrets/admin_token]

Without --url it reads the configuration the way the daemon does ($RELAY_CONFIG,
else /etc/sysmail-relay/relay.toml, else the built-in default, with RELAY_*
variables over it), so it asks the admin listener where it really is and sends the
admin token when one is configured (about 0.3 s of CPU: it loads the relay's
settings). With --url (and --token-file when the admin listener wants a token) it
only speaks HTTP (about 0.03 s): for probes that run often, e.g. in Kubernetes.
Exit 0 healthy, 1 unhealthy (the Docker/Podman/Kubernetes convention), with one
line saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def from_configuration() -> tuple[str, str | None]:
    from relay.settings import admin_token, config_path, load_settings

    admin = load_settings(config_path(None, os.environ)).admin
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin.host, admin.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{admin.port}", admin_token(admin)


def main() -> int:
    parser = argparse.ArgumentParser(prog="sysmail-relay-healthcheck")
    parser.add_argument("path", nargs="?", default="/healthz", choices=["/healthz", "/readyz"])
    parser.add_argument("--url", help="the admin listener, e.g. http://127.0.0.1:8525")
    parser.add_argument("--token-file", help="the admin token (with --url)")
    args = parser.parse_args()
    try:
        if args.url:
            base = args.url.rstrip("/")
            token = None
            if args.token_file:
                with open(args.token_file, encoding="utf-8") as f:
                    token = f.read().strip() or None
        else:
            base, token = from_configuration()
    except Exception as e:  # an unreadable configuration: the daemon cannot be healthy either
        print(f"unhealthy: configuration: {e}")
        return 1
    request = urllib.request.Request(base + args.path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            print(response.read(200).decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as e:
        print(f"unhealthy: {args.path}: {e.code} {e.read(200).decode(errors='replace').strip()}")
    except OSError as e:
        print(f"unhealthy: {args.path}: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
