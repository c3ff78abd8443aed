"""Client load: Postfix's smtp-source (C, cheap) and a small asyncio client for latency.

smtp-source gives the throughput figures with the least client CPU. It reports
no per-message timing, so the time from the final "." to the 250 comes from
`measure_latency`, which drives the same shape of load (one connection per
message, like smtp-source without -d and like most applications) with raw
asyncio streams: no SMTP library between the clock and the socket.

For scenario M: `hold_idle_sessions` (connections that said EHLO and wait),
`send_message` (one message through smtplib) and `greeting` (the 220 line).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tests.peers.netutil import HOST
from tests.peers.procutil import require

SENDER = "app@bench.example.com"
RECIPIENT = "user@example.com"
EHLO = b"EHLO bench.example.com"
_LINE = 76  # body line length, before CRLF


def smtp_source_command(port: int, messages: int, size: int, sessions: int) -> list[str]:
    return [require("smtp-source"), "-s", str(sessions), "-m", str(messages),
            "-l", str(size), "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}"]


@contextlib.contextmanager
def smtp_source(port: int, messages: int, size: int,
                sessions: int) -> Iterator[subprocess.Popen[bytes]]:
    """smtp-source running in the background; killed on leaving if it is still running."""
    process = subprocess.Popen(smtp_source_command(port, messages, size, sessions),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def finish(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    """Wait for smtp-source; (exit code, its output). Killed at *timeout*."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        return -9, out.decode(errors="replace") + "\n(killed at the time limit)"
    return process.returncode, out.decode(errors="replace")


def send_message(port: int, data: bytes, timeout: float) -> None:
    """One message through smtplib (SIZE declared); smtplib.SMTPException when refused."""
    with smtplib.SMTP(HOST, port, local_hostname="bench.example.com",
                      timeout=timeout) as client:
        client.sendmail(SENDER, [RECIPIENT], data)


def greeting(port: int, timeout: float) -> bytes:
    """Connect, read the greeting line, QUIT."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock, \
            sock.makefile("rb") as replies:
        line = replies.readline()
        sock.sendall(b"QUIT\r\n")
    return line


def message_bytes(size: int, number: int = 0) -> bytes:
    """Headers, then a body of exactly *size* bytes (>= 2) in CRLF lines not starting with '.'."""
    head = (f"From: Bench App <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
            f"Subject: bench {number}\r\nMessage-ID: <bench-{number}@bench.example.com>\r\n\r\n")
    return head.encode() + _body(size)


def _body(size: int) -> bytes:
    line = b"x" * _LINE + b"\r\n"
    full, rest = divmod(max(size, 2), len(line))
    if rest == 1:  # no 1-byte line: make the last line one longer instead
        full, rest = full - 1, rest + len(line)
    tail = b"x" * (rest - 2) + b"\r\n" if rest else b""
    return line * full + tail


@dataclass
class LatencyResult:
    latencies: list[float] = field(default_factory=list)
    """Seconds from writing the final '.' to reading the 250, one per accepted message."""
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    client_cpu_seconds: float = 0.0


class _Reply(Exception):
    pass


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (multi-line ones included); its last line."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise _Reply(f"connection closed or short reply: {line!r}")
        if line[3:4] != b"-":
            return line


async def _expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    line = await _read_reply(reader)
    if not line.startswith(code):
        raise _Reply(line.decode(errors="replace").strip())
    return line


async def _one_message(port: int, data: bytes, result: LatencyResult) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await _expect(reader, b"220")
        for command, code in ((EHLO, b"250"),
                              (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
                              (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
                              (b"DATA", b"354")):
            writer.write(command + b"\r\n")
            await _expect(reader, code)
        writer.write(data)
        await writer.drain()
        started = time.perf_counter()
        writer.write(b".\r\n")
        await _expect(reader, b"250")
        result.latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await _expect(reader, b"221")
    finally:
        writer.close()
        await writer.wait_closed()


async def _session(port: int, data: bytes, todo: itertools.count[int], messages: int,
                   result: LatencyResult) -> None:
    while next(todo) < messages:
        try:
            await _one_message(port, data, result)
        except (OSError, _Reply) as e:
            result.errors.append(str(e) or type(e).__name__)
            if len(result.errors) > max(10, messages // 10):
                return


async def _drive(port: int, messages: int, size: int, sessions: int) -> LatencyResult:
    result = LatencyResult()
    data = message_bytes(size)
    todo = itertools.count()
    cpu0, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(_session(port, data, todo, messages, result)
                           for _ in range(sessions)))
    result.seconds = time.perf_counter() - started
    result.client_cpu_seconds = time.process_time() - cpu0
    return result


def measure_latency(port: int, messages: int, size: int, sessions: int,
                    timeout: float) -> LatencyResult:
    """Send *messages* over *sessions* concurrent connections; time every final '.'."""
    return asyncio.run(asyncio.wait_for(_drive(port, messages, size, sessions), timeout))


# --- idle sessions: connections that said EHLO and then wait ------------------------------

@dataclass
class IdleSessions:
    greeted: int = 0
    """Connections that read the 220 greeting and a 250 to EHLO."""
    errors: list[str] = field(default_factory=list)
    seconds_to_open: float = 0.0


async def _open_idle(port: int, writers: list[asyncio.StreamWriter],
                     result: IdleSessions) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    writers.append(writer)
    await _expect(reader, b"220")
    writer.write(EHLO + b"\r\n")
    await _expect(reader, b"250")
    result.greeted += 1


async def _hold(port: int, count: int, while_open: Callable[[], None]) -> IdleSessions:
    result = IdleSessions()
    writers: list[asyncio.StreamWriter] = []
    started = time.perf_counter()
    try:
        for _ in range(count):  # one after the other: no burst beyond the listen backlog
            try:
                await _open_idle(port, writers, result)
            except (OSError, _Reply) as e:
                result.errors.append(str(e) or type(e).__name__)
        result.seconds_to_open = time.perf_counter() - started
        while_open()
    finally:
        for writer in writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return result


def hold_idle_sessions(port: int, count: int, while_open: Callable[[], None],
                       timeout: float) -> IdleSessions:
    """Open *count* connections that read 220 and send EHLO, call *while_open* while they
    all stay open and idle, then close them."""
    return asyncio.run(asyncio.wait_for(_hold(port, count, while_open), timeout))
