"""Postfix's smtp-sink(1): a fast SMTP server that accepts and discards, for benchmarks."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers.netutil import HOST, free_ports, wait_ports_closed, wait_ports_listening
from tests.peers.procutil import require


@dataclass
class SmtpSink:
    port: int
    process: subprocess.Popen[bytes]
    host: str = HOST

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        wait_ports_closed([self.port], timeout)


def start(log_file: Path, backlog: int = 256, extra_args: tuple[str, ...] = ()) -> SmtpSink:
    """Start ``smtp-sink -c 127.0.0.1:PORT BACKLOG`` (foreground child) on a free port.

    *extra_args* go before the address, e.g. ``("-d", "%Y%m%d%H/%M.")`` or ``("-R", dir)``.
    """
    binary = require("smtp-sink")
    (port,) = free_ports(1)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [binary, "-u", "nobody", *extra_args, f"{HOST}:{port}", str(backlog)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    sink = SmtpSink(port=port, process=proc)
    try:
        wait_ports_listening([port], 10.0)
    except TimeoutError:
        sink.stop()
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"smtp-sink exited with {proc.returncode}: see {log_file}")
    return sink
