"""Scenarios T and X: end to end through an upstream that wants STARTTLS and a login.

T: smtp-source -> the system under test -> a fresh upstream Postfix (bench/upstream.py:
STARTTLS required, AUTH PLAIN through Dovecot, every message discarded). The relay
with `encryption = "starttls"`, its CA in `ca_file`, `[servers.sink.auth]` PLAIN
and otherwise its defaults; the Postfix null client with the same hop (TLS
required, SASL PLAIN, connection and TLS session caches: bench/nullclient.py).
Besides B's figures, the upstream's log gives its sessions, TLS handshakes (and
the resumed ones) and AUTH exchanges per 1,000 messages.

X: the relay alone with XOAUTH2 to the upstream's OAuth listener, the token checked by
Dovecot at the test authorization server (tests/oauth_server.py), whose access tokens
live X_ACCESS_TTL seconds. The load comes in two halves with an idle gap between them
longer than the listener's idle timeout: the upstream closes the relay's sessions, the
token they used expires, and the second half's sessions need a new one.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

from bench.nullclient import TlsHop, start_null_client
from bench.relay_instance import DEFAULTS, RelayOptions, clean_env, relay_binary
from bench.scenarios import (
    RELAY,
    Instance,
    Measurement,
    System,
    measuring,
    relay_through,
    start_relay_into,
)
from bench.upstream import ACCOUNT, TlsUpstream
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, AuthServer
from tests.peers.postfix_listeners import OAUTH_IDLE_TIMEOUT
from tests.peers.procutil import write_file

KIB = 1024
OAUTH_CLIENT: Final = "bench"
X_ACCESS_TTL = 2
"""Seconds an access token from the test authorization server lives in scenario X."""
X_GAP = OAUTH_IDLE_TIMEOUT + 1.5
"""Seconds of no load between X's halves: the upstream drops idle sessions after
OAUTH_IDLE_TIMEOUT, and every token issued before the gap has expired."""
FULL: Final = {KIB: 2000, 100 * KIB: 600}
QUICK: Final = {KIB: 400, 100 * KIB: 150}


def counts(quick: bool, scale: float) -> dict[int, int]:
    """Messages per T and X measurement, by size."""
    return {size: max(20, round(n * scale)) for size, n in (QUICK if quick else FULL).items()}


def relay_server(upstream: TlsUpstream, directory: Path) -> str:
    """The [servers.sink] keys for T: STARTTLS, the upstream's CA, AUTH PLAIN."""
    password = write_file(directory / "password", ACCOUNT.password, mode=0o600)
    return (f'encryption = "starttls"\nca_file = "{upstream.ca_file}"\n'
            f'[servers.sink.auth]\nmethod = "PLAIN"\nusername = "{ACCOUNT.username}"\n'
            f'password_file = "{password}"\n')


def relay_oauth(upstream: TlsUpstream, authority: AuthServer, directory: Path) -> RelayOptions:
    """The relay's options for X: STARTTLS, then XOAUTH2 with a token of a generic OAuth
    client at *authority*; the system address is the mailbox signed in as."""
    secret = write_file(directory / "client-secret", CLIENT_SECRET, mode=0o600)
    url = authority.url
    client = (f"\n[oauth_clients.{OAUTH_CLIENT}]\nprovider = \"generic\"\n"
              f"client_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{secret}\"\n"
              f"authorize_url = \"{url}/authorize\"\ntoken_url = \"{url}/token\"\n"
              'scopes = ["smtp", "offline_access"]\n')
    server = (f'encryption = "starttls"\nca_file = "{upstream.ca_file}"\n'
              f'[servers.sink.oauth]\nclient = "{OAUTH_CLIENT}"\n')
    return dataclasses.replace(DEFAULTS, server=server, extra=client)


def end_to_end_tls(workdir: Path, system: System, size: int, messages: int, sessions: int,
                   round_: int, variant: str = "", options: RelayOptions = DEFAULTS,
                   scenario: str = "T", postfix_tls_reuse: bool = True) -> Measurement:
    """One T measurement (or a TS cell: *scenario*, *options*) with a fresh upstream."""
    result = Measurement(scenario, system, size, round_, messages, variant=variant)
    workdir.mkdir(parents=True, exist_ok=True)
    with TlsUpstream(workdir / "upstream") as upstream:
        instance: Instance
        if system == RELAY:
            options = dataclasses.replace(options, server=relay_server(upstream, workdir))
            instance = start_relay_into(workdir, upstream.port, result, options)
        else:
            hop = TlsHop(upstream.ca_file, ACCOUNT.username, ACCOUNT.password,
                         connection_reuse=postfix_tls_reuse)
            instance = start_null_client(workdir / "postfix", upstream.port, hop)
            result.extra["postfix_tls_connection_reuse"] = postfix_tls_reuse
        cpu0 = upstream.cpu_seconds()
        with measuring(result, instance):
            relay_through(instance, upstream, result, size, messages, sessions)
            _upstream_cpu(result, upstream, cpu0, messages)
        if result.status == "ok":  # the system under test is stopped: its sessions ended
            _hop_figures(result, upstream, messages)
    return result


def xoauth2(workdir: Path, size: int, messages: int, sessions: int, round_: int) -> Measurement:
    """One X measurement: the relay with XOAUTH2, two halves with a gap in between."""
    result = Measurement("X", RELAY, size, round_, messages)
    workdir.mkdir(parents=True, exist_ok=True)
    authority = AuthServer().start()
    try:
        authority.access_ttl = X_ACCESS_TTL
        with TlsUpstream(workdir / "upstream", authority) as upstream:
            options = relay_oauth(upstream, authority, workdir)
            relay = start_relay_into(workdir, upstream.oauth_port, result, options)
            with measuring(result, relay):
                sign_in(relay.directory / "relay.toml")
                cpu0 = upstream.cpu_seconds()
                _two_halves(relay, upstream, authority, result, size, sessions)
                _upstream_cpu(result, upstream, cpu0, messages)
            if result.status == "ok":
                _hop_figures(result, upstream, messages)
            result.extra.update(token_events=list(authority.events),
                                introspections_refused=authority.introspections.count(False),
                                introspections_active=authority.introspections.count(True))
    finally:
        authority.close()
    return result


def _two_halves(relay: Instance, upstream: TlsUpstream, authority: AuthServer,
                result: Measurement, size: int, sessions: int) -> None:
    first = result.messages // 2
    halves = [dataclasses.replace(result, messages=n, figures={}, extra={})
              for n in (first, result.messages - first)]
    refreshes = []
    for number, half in enumerate(halves):
        if number:
            time.sleep(X_GAP)  # the sessions close, the token expires
        before = authority.count("refresh_token ok")
        relay_through(relay, upstream, half, size, half.messages, sessions)
        refreshes.append(authority.count("refresh_token ok") - before)
    seconds = sum(float(h.extra["seconds_to_sink"]) for h in halves)
    cpu_ms = sum(h.figures["cpu_ms_per_msg"] * h.messages for h in halves)
    result.figures.update(end_to_end_per_s=result.messages / seconds,
                          cpu_ms_per_msg=cpu_ms / result.messages,
                          token_refreshes=float(sum(refreshes)))
    result.extra.update(refreshes_per_half=refreshes,
                        halves=[{"messages": h.messages, **h.figures, **h.extra}
                                for h in halves],
                        failed=relay.failed(), seconds_to_sink=seconds)


def sign_in(config: Path, timeout: float = 30.0) -> None:
    """`sysmail-relay oauth authorize --no-browser`, this harness playing the browser: it
    opens the printed address, the test authorization server signs in at once and
    redirects to the command's loopback listener, which stores the token."""
    command = [relay_binary(), "oauth", "authorize", "--no-browser", "--config", str(config)]
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=clean_env()) as process:
        try:
            assert process.stdout is not None
            url = next((line.strip() for line in process.stdout
                        if line.strip().startswith("http")), None)
            if url is not None:
                with urllib.request.urlopen(url, timeout=timeout) as page:
                    page.read()
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`sysmail-relay oauth authorize` did not finish within "
                               f"{timeout:g} s after the sign-in page was opened") from None
        finally:
            if process.poll() is None:
                process.kill()
    if url is None or process.returncode != 0:
        raise RuntimeError(f"`sysmail-relay oauth authorize` failed (exit "
                           f"{process.returncode}): {out.strip()[-300:]} {err.strip()[-300:]}")


def _upstream_cpu(result: Measurement, upstream: TlsUpstream, cpu0: float,
                  messages: int) -> None:
    used = upstream.cpu_seconds() - cpu0
    result.figures["upstream_cpu_ms_per_msg"] = used * 1000 / messages


def _hop_figures(result: Measurement, upstream: TlsUpstream, messages: int) -> None:
    hop = upstream.settled_counts()
    result.figures.update(hop.figures(messages))
    result.extra["upstream"] = dataclasses.asdict(hop)


def describe(scenarios: tuple[str, ...], messages: dict[int, int]) -> dict[str, str]:
    load = ", ".join(f"{n} at {size // KIB} KiB" for size, n in messages.items())
    return {
        "T": f"T  smtp-source -> system under test -> upstream Postfix (STARTTLS required, "
             f"AUTH PLAIN via Dovecot, discard). {load} messages; figures as B; "
             "handshakes and AUTH counted in the upstream's log, per 1,000 messages",
        "X": f"X  as T for the relay alone with XOAUTH2 (token checked by introspection); "
             f"{load} messages in two halves {X_GAP:g} s apart, access tokens live "
             f"{X_ACCESS_TTL} s, so the second half needs a new one",
    }


def summary(measurements: list[Measurement]) -> dict[str, Any]:
    """X's token events, for the JSON."""
    return {f"{m.size // KIB} KiB round {m.round}": {
        "refreshes_per_half": m.extra.get("refreshes_per_half"),
        "events": m.extra.get("token_events")} for m in measurements if m.scenario == "X"}
