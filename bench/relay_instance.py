"""The installed `sysmail-relay serve`, started with its own TOML file and state_dir."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import memory_kib, process_tree, reset_peak_memory, tree_cpu_seconds, tree_names
from tests.peers.netutil import HOST, free_ports, wait_ports_closed, wait_ports_listening

SYSTEM_ADDRESS = "notify@example.com"
SINK_SERVER = "sink"
UNAVAILABLE_MARKER = "not available in this version"
_PENDING_DIRS = ("incoming", "queue", "active")
"""trash/ is not among them: it holds delivered entries while they are deleted."""

CONFIG = """# sysmail-relay under benchmark (written by bench/run.py)
state_dir = "{state_dir}"

[listener]
host = "{host}"
port = {port}
max_connections = {max_connections}
{max_message_size}{workers}
[system_account]
active = {active}
address = "{address}"
server = "{server}"

[admin]
host = "{host}"
port = {admin_port}

[log]
level = "info"
format = "text"
"""

SINK_SECTION = """
[servers.{name}]
host = "{host}"
port = {port}
{pool_size}{server}"""
PLAIN_SERVER = 'encryption = "none"\n'


@dataclass(frozen=True)
class RelayOptions:
    """What a measurement changes in the relay's configuration; the rest stays default."""

    max_connections: int = 500
    max_message_size: int | None = None
    """listener.max_message_size in bytes; None: the relay's default."""
    pool_size: int | None = None
    """servers.sink.pool_size, upstream connections; None: the relay's default."""
    active: bool = True
    """False: the system account is inactive, so the queue is held and nothing is sent."""
    workers: int | None = None
    """listener.workers; None: the relay's default ("auto")."""
    server: str = PLAIN_SERVER
    """The rest of [servers.sink] after host, port and pool_size (its sub-tables too):
    scenario B's plain hop, or TLS and a login for T and X (bench/tls.py)."""
    extra: str = ""
    """TOML tables appended to the file (X: its [oauth_clients.NAME])."""


DEFAULTS = RelayOptions()


class RelayUnavailable(Exception):
    """The relay refused to start because this configuration is not supported yet."""


def relay_binary() -> str:
    """`sysmail-relay` beside the running interpreter (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "sysmail-relay"
    if beside.exists():
        return str(beside)
    found = shutil.which("sysmail-relay")
    if found is None:
        raise FileNotFoundError("sysmail-relay is not installed in this Python environment")
    return found


def code_fingerprint() -> str:
    """A short hash of the relay package's source as this run starts it.

    The package is installed editable and others edit relay/ while benchmarks
    run: each relay started may run different code. Recording this per
    measurement shows when that happened.
    """
    spec = importlib.util.find_spec("relay")
    if spec is None or spec.origin is None:
        return "unknown"
    digest = hashlib.sha256()
    for path in sorted(Path(spec.origin).parent.rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class RelayInstance:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    admin_port: int
    started: float
    """time.monotonic() just before the process was started"""
    code: str = "unknown"

    @property
    def log_file(self) -> Path:
        return self.directory / "relay.log"

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.process.pid)

    def process_names(self) -> dict[str, int]:
        return tree_names(self.process.pid)

    def memory_mib(self, field: str = "VmRSS") -> float:
        """The resident memory now (VmRSS) or at its peak (VmHWM) of the relay and its
        intake workers, in MiB (the peaks summed: at most the sum)."""
        total = 0
        for p in process_tree(self.process.pid):
            with contextlib.suppress(FileNotFoundError):  # it ended meanwhile
                total += memory_kib(p.pid).get(field, 0)
        return total / 1024

    def reset_peak_memory(self) -> None:
        """From now on VmHWM is the peak since this call."""
        for p in process_tree(self.process.pid):
            with contextlib.suppress(FileNotFoundError):
                reset_peak_memory(p.pid)

    def metrics(self) -> dict[str, float]:
        """The admin listener's /metrics: series (name and labels as written) -> value."""
        url = f"http://{HOST}:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                found[series] = float(value)
        return found

    def pending(self) -> int:
        """Messages received but not yet handed to the upstream (or the outbox)."""
        spool = self.state_dir / "spool"
        return sum(_count_entries(spool / name) for name in _PENDING_DIRS)

    def failed(self) -> int:
        return _count_entries(self.state_dir / "spool" / "dead")

    def outbox_count(self) -> int:
        return _count_entries(self.state_dir / "outbox" / "new")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        wait_ports_closed([self.port], timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def write_config(directory: Path, port: int, sink_port: int | None, admin_port: int,
                 options: RelayOptions = DEFAULTS) -> Path:
    size = options.max_message_size
    text = CONFIG.format(
        state_dir=directory / "state",
        host=HOST,
        port=port,
        max_connections=options.max_connections,
        max_message_size="" if size is None else f"max_message_size = {size}\n",
        workers="" if options.workers is None else f"workers = {options.workers}\n",
        active=str(options.active).lower(),
        address=SYSTEM_ADDRESS,
        server="local" if sink_port is None else SINK_SERVER,
        admin_port=admin_port,
    )
    if sink_port is not None:
        pool = options.pool_size
        text += SINK_SECTION.format(name=SINK_SERVER, host=HOST, port=sink_port,
                                    pool_size="" if pool is None else f"pool_size = {pool}\n",
                                    server=options.server)
    text += options.extra
    path = directory / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def start_relay(directory: Path, sink_port: int | None = None, timeout: float = 20.0,
                options: RelayOptions = DEFAULTS) -> RelayInstance:
    """Start `sysmail-relay serve` delivering into the local outbox, or into *sink_port*.

    Its state_dir is *directory*/state: a spool prepared there beforehand is used.

    Raises RelayUnavailable when the relay says the configuration is not supported
    yet, RuntimeError for any other failure to start.
    """
    directory.mkdir(parents=True, exist_ok=True)
    code = code_fingerprint()
    port, admin_port = free_ports(2)
    config = write_config(directory, port, sink_port, admin_port, options)
    started = time.monotonic()
    with (directory / "relay.log").open("ab") as log:
        process = subprocess.Popen(
            [relay_binary(), "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=clean_env(),
            start_new_session=True,  # Ctrl-C reaches the harness only; it stops the relay
        )
    relay = RelayInstance(directory, port, process, admin_port, started, code)
    try:
        _wait_listening(relay, timeout)
    except BaseException:
        relay.stop()
        raise
    return relay


def _wait_listening(relay: RelayInstance, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not relay.alive():
            tail = relay.log_tail()
            if UNAVAILABLE_MARKER in tail:
                raise RelayUnavailable(_unavailable_line(tail))
            raise RuntimeError(f"sysmail-relay exited with {relay.process.returncode} at "
                               f"start:\n{tail}")
        try:
            wait_ports_listening([relay.port], 0.1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sysmail-relay not listening on {relay.port} after "
                                   f"{timeout:g} s:\n{relay.log_tail()}") from None


def _unavailable_line(tail: str) -> str:
    for line in tail.splitlines():
        if UNAVAILABLE_MARKER in line:
            return line.strip()
    return tail.strip()


def clean_env() -> dict[str, str]:
    """No RELAY_* or STATE_DIRECTORY from the caller may override the benchmark's file."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("RELAY_") and k != "STATE_DIRECTORY"}


def _count_entries(directory: Path) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0
