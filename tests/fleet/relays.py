"""Three (or more) `sysmail-relay serve` processes of one fleet, as an operator runs them:
each with its own state directory and listener, one Redis, one upstream that records
when each message arrives."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support import Daemon, free_port, relay_command
from tests.upstream_servers import Script


@dataclass
class Arrivals(Script):
    """An upstream that records when each message arrived, and for whom."""

    arrived: list[tuple[float, str]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        now = time.time()
        self.arrived.extend((now, rcpt) for rcpt in envelope.rcpt_tos)
        return reply


def relay_config(directory: Path, port: int, upstream: int, redis_url: str,
                 server: str = "", extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "relay.toml"
    path.write_text(f"""
state_dir = "{directory / 'state'}"
[listener]
port = {port}
workers = 1
[system_account]
address = "notify@example.com"
server = "system"
[servers.system]
host = "127.0.0.1"
port = {upstream}
encryption = "none"
timeout = 5
{server}
[queue]
retry_initial = "1s"
retry_max = "2s"
[admin]
port = 0
[fleet]
url = "{redis_url}"
node_name = "{directory.name}"
heartbeat = 1
timeout = 0.5
{extra}
""")
    return path


class Fleet:
    def __init__(self, base: Path, count: int, upstream: int, redis_url: str,
                 server: str = "", extra: str = "") -> None:
        self.daemons: list[Daemon] = []
        self.configs: list[Path] = []
        for i in range(count):
            port = free_port()
            config = relay_config(base / f"relay{i}", port, upstream, redis_url, server, extra)
            self.configs.append(config)
            self.daemons.append(Daemon(config, base / f"relay{i}.log", port))

    def start(self) -> None:
        for daemon in self.daemons:
            daemon.start()

    def stop(self) -> None:
        for daemon in self.daemons:
            if daemon.proc is not None:
                daemon.stop()

    def status(self, i: int) -> dict[str, Any]:
        """`sysmail-relay status --json` of relay i."""
        out = subprocess.run([relay_command(), "--config", str(self.configs[i]), "status",
                              "--json"], capture_output=True, text=True, timeout=30)
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def status_text(self, i: int) -> str:
        return subprocess.run([relay_command(), "--config", str(self.configs[i]), "status"],
                              capture_output=True, text=True, timeout=30).stdout


def submit(port: int, recipients: list[str]) -> None:
    """One message per recipient, over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for rcpt in recipients:
            body = (f"From: app@apps.example.com\r\nTo: {rcpt}\r\nSubject: to {rcpt}\r\n\r\n"
                    "hello\r\n")
            client.sendmail("app@apps.example.com", [rcpt], body)


async def submit_to_all(fleet: Fleet, per_relay: int) -> list[str]:
    """Offer `per_relay` messages to every relay at once; the recipients, all different."""
    batches = [[f"r{i}-{n}@example.com" for n in range(per_relay)]
               for i in range(len(fleet.daemons))]
    await asyncio.gather(*(asyncio.to_thread(submit, d.port, batch)
                           for d, batch in zip(fleet.daemons, batches, strict=True)))
    return [rcpt for batch in batches for rcpt in batch]


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Until `predicate` holds (run in a thread: it may run a command), `within` s at most."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, f"not within {within:.0f} s: {what}"
        await asyncio.sleep(0.1)
