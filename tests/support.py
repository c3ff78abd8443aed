"""A byte-exact SMTP client for tests that must send what no polite client would."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.app import Relay
from relay.errors import DeliveryFailure, PermanentFailure, TemporaryFailure
from relay.settings import Settings
from relay.spool import files as spool_file
from relay.upstream.base import Outcome, Outgoing

RelayFactory = Callable[..., Awaitable[Relay]]


class RawSMTP:
    """Speaks SMTP over a real socket, sending exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawSMTP:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def reply(self, wait: float = 10) -> str:
        """One complete (possibly multi-line) reply; '' when the server closed."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), wait)
            if not line:
                return "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> str:
        raw = line.encode() if isinstance(line, str) else line
        await self.send(raw + b"\r\n")
        return await self.reply()

    async def transaction(self, body: bytes, sender: str = "app@example.com",
                          rcpts: tuple[str, ...] = ("user@example.com",),
                          mail_params: str = "") -> str:
        """EHLO (once), MAIL, RCPT..., DATA with `body` sent as is (it must end the data)."""
        for expect, line in (("250", f"MAIL FROM:<{sender}>{mail_params}"),
                             *(("250", f"RCPT TO:<{r}>") for r in rcpts)):
            got = await self.cmd(line)
            assert got.startswith(expect), f"{line!r} -> {got!r}"
        got = await self.cmd("DATA")
        assert got.startswith("354"), got
        await self.send(body)
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class ScriptedUpstream:
    """The in-memory twin of an upstream server: answers from a script, records what it got.

    `script` maps a recipient to a list of replies used one per attempt (the last one
    repeats); a reply starting with 2 is accepted, 4 deferred, 5 failed. A
    `message_failure` raises for the whole message instead.
    """

    name = "scripted"

    def __init__(self, script: dict[str, list[str]] | None = None,
                 wants_data: bool = False) -> None:
        self.script = script or {}
        self.wants_data = wants_data
        self.data_given: list[bool] = []
        self.attempts: dict[str, int] = {}
        self.received: list[tuple[str, list[str], bytes]] = []
        self.message_failure: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        if self.gate is not None:
            await self.gate.wait()
        if self.message_failure is not None:
            raise self.message_failure
        outcomes = []
        accepted = []
        for rcpt in message.recipients:
            replies = self.script.get(rcpt.address, ["250 2.1.5 OK"])
            n = self.attempts.get(rcpt.address, 0)
            self.attempts[rcpt.address] = n + 1
            reply = replies[min(n, len(replies) - 1)]
            failure: DeliveryFailure | None = None
            if reply.startswith("4"):
                failure = TemporaryFailure(reply, code=int(reply[:3]))
            elif reply.startswith("5"):
                failure = PermanentFailure(reply, code=int(reply[:3]))
            else:
                accepted.append(rcpt.address)
            outcomes.append(Outcome(rcpt.address, reply, failure))
        if accepted:  # the bytes sent: data, else head and the file from offset
            on_disk = message.path.read_bytes()
            start = 0  # past the entry's header, if it has one (not an earlier layout's)
            if message.path.name != "message":
                start = int(on_disk[len(spool_file.MAGIC):spool_file.PREAMBLE - 1], 16)
            from_file = message.head + on_disk[message.offset:]
            if message.data is not None and not message.envelope.as_received:
                assert message.data == on_disk[start:], "Outgoing.data differs from the spool's"
            if message.data is None:
                assert message.offset >= start
                assert message.head or message.offset == start
            self.data_given.append(message.data is not None)
            self.received.append((message.mail_from, accepted,
                                  from_file if message.data is None else message.data))
        return outcomes

    async def close(self) -> None:
        return None

    def not_before(self) -> float:
        return 0.0


def free_port() -> int:
    """A port that was free a moment ago (for daemons that must keep theirs across restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def relay_command() -> str:
    """The installed `sysmail-relay` console script beside this Python."""
    path = Path(sys.executable).parent / "sysmail-relay"
    if not path.exists():
        found = shutil.which("sysmail-relay")
        assert found, "sysmail-relay is not installed: pip install -e '.[test]'"
        return found
    return str(path)


class Daemon:
    """`sysmail-relay serve --config FILE` as an operator runs it, as a child process."""

    def __init__(self, config: Path, log: Path, port: int, host: str = "127.0.0.1") -> None:
        self.config = config
        self.log = log
        self.port = port
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [relay_command(), "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n"
                                     + self.log.read_text())
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()  # never leave a daemon behind
        self.proc.wait(10)
        raise AssertionError("serve did not start listening:\n" + self.log.read_text())

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, wait; SIGKILL if it has not ended: never leave a daemon behind."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def settings_for(state_dir: Path, **sections: Any) -> Settings:
    """Settings for a test: listener on port 0 in this process (workers = 1: the test
    sees its sessions and metrics), the given sections merged over the defaults."""
    data: dict[str, Any] = {"state_dir": state_dir, "listener": {"port": 0, "workers": 1}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Settings(**data)


def listener_port(relay: Relay) -> int:
    assert relay.listener is not None and relay.listener.address is not None
    return relay.listener.address[1]


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a condition that the relay makes true asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within:.1f} s")
        await asyncio.sleep(0.01)


def outbox_files(state_dir: Path) -> list[Path]:
    new = state_dir / "outbox" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def daemon_config(path: Path, state: Path, port: int, active: bool = True) -> Path:
    """A TOML file for `sysmail-relay serve`: the outbox, quick retries, a free admin port."""
    path.write_text(f"""
state_dir = "{state}"
[listener]
port = {port}
[system_account]
address = "notify@example.com"
active = {str(active).lower()}
[queue]
retry_initial = "0.5s"
retry_max = "1s"
[admin]
port = 0
""")
    return path


def to_old_layout(entry: Path) -> Path:
    """Turn a spool entry (one file: header, then the message) into the layout of
    earlier versions, a directory with `envelope.json` and `message`: what an upgrade
    finds on disk."""
    data = entry.read_bytes()
    start = int(data[len(spool_file.MAGIC):spool_file.PREAMBLE - 1], 16)
    entry.unlink()
    entry.mkdir(mode=0o700)
    (entry / "envelope.json").write_bytes(data[spool_file.PREAMBLE:start].strip())
    (entry / "message").write_bytes(data[start:])
    return entry
