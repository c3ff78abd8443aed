"""Scenario L: the SMTP libraries alone, the most the relay could carry on this machine.

Delivery: the relay sends through aiosmtplib's public `SMTP` API (`mail`, `rcpt`,
`data`), from the one process that runs delivery (docs/DESIGN.md). Here a child
process does only that: `pool_size` sessions of aiosmtplib (the relay's default
number of upstream connections) into a fresh smtp-sink, each sending its share of N
messages of the size asked for, one transaction after another, with no spool, no
rewrite and no scheduler. What it reaches, in messages per second and CPU per message
of that one process, bounds what the relay's delivery can reach. The same again
through the hop of scenario T: a fresh upstream Postfix (bench/upstream.py) that
wants STARTTLS and AUTH PLAIN, each session encrypted and logged in before the clock
starts, as the relay keeps its sessions.

Intake, at 1 KiB only: aiosmtpd as it comes, in one process, with a handler that
answers 250 to DATA at once (nothing written), under B's smtp-source load. Its CPU
per message is what aiosmtpd's connection, session and command handling cost before
the relay does anything. (At 100 KiB aiosmtpd's own DATA loop, line by line, costs
more than the relay's listener, which reads DATA in chunks: not a bound there.)

The table sets each beside Postfix's figures of the same run: delivery's rate
against Postfix's end to end in B (through the T hop: in T), intake's against the
rate at which smtp-source finished in B, and the CPU per message against Postfix's
whole CPU per message (the two libraries' together, for B).

Run as a module, it is the child: `python -m bench.library` reads its job as JSON on
its standard input (`part` "send" or "receive", `size`, `messages`, `sessions`; for
send `port` and, through T's hop, `tls` with the CA file and the login) and prints one
JSON object with `seconds` and `cpu_seconds` (send: from the first MAIL to the last
reply, the sessions connected, encrypted and logged in before; receive: while
smtp-source runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.load import RECIPIENT, smtp_source_command
from bench.procstat import runtime_seconds
from bench.scenarios import RELAY, Measurement, MeasurementError, Upstream, time_limit, wait_for
from bench.sink import CountingSink
from bench.upstream import ACCOUNT, TlsUpstream

ROOT = Path(__file__).resolve().parent.parent
SENDER = "relay@bench.example.com"
"""The envelope sender the relay would use: the system address."""
LINE = b"X" * 70 + b"\r\n"
INTAKE_SIZE = 1024
"""The size at which aiosmtpd alone bounds intake (see above)."""


def message(size: int) -> bytes:
    """*size* bytes in the shape of a rewritten message: a few headers, 72-byte lines."""
    head = (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench\r\n"
            "Message-ID: <bench@bench.example.com>\r\n\r\n").encode()
    lines = max(1, (size - len(head)) // len(LINE))
    return head + LINE * lines


def default_pool_size() -> int:
    """The relay's default number of connections to its upstream (`pool_size`)."""
    from relay.settings import ServerSettings

    return int(ServerSettings.model_fields["pool_size"].default)


def describe(counts: dict[int, int]) -> str:
    amounts = ", ".join(f"{n} at {size // 1024} KiB" for size, n in counts.items())
    return (f"L  the libraries alone, {amounts} messages: aiosmtplib (mail, rcpt, data from "
            f"one process, {default_pool_size()} sessions, the relay's pool_size) -> "
            "smtp-sink, and -> T's upstream (STARTTLS, AUTH PLAIN); msg/s from the first "
            "MAIL to the last reply; at 1 KiB aiosmtpd as it comes (250 to DATA at once, "
            "nothing written) <- smtp-source; CPU = that process; ratios against Postfix's "
            "figures of this run (B, or T for the STARTTLS rows): the most the relay could "
            "carry")


def measure(workdir: Path, size: int, messages: int, round_: int, pool_size: int,
            sessions: int) -> Measurement:
    """Delivery: *messages* through *pool_size* aiosmtplib sessions into smtp-sink, then
    through STARTTLS and AUTH PLAIN into T's upstream; at 1 KiB also intake: *messages*
    from smtp-source's *sessions* into aiosmtpd alone."""
    result = Measurement("L", RELAY, size, round_, messages)
    job = {"size": size, "messages": messages, "sessions": pool_size}
    with CountingSink(workdir / "sink.log") as sink:
        sent = _child({"part": "send", "port": sink.port, **job})
        _wait_for(sink, messages)
    result.figures["end_to_end_per_s"] = messages / sent["seconds"]
    result.figures["cpu_ms_per_msg"] = sent["cpu_seconds"] * 1000 / messages
    with TlsUpstream(workdir / "upstream") as upstream:
        login = {"ca_file": str(upstream.ca_file), "username": ACCOUNT.username,
                 "password": ACCOUNT.password}
        hop = _child({"part": "send", "port": upstream.port, "tls": login, **job})
        _wait_for(upstream, messages)
    result.figures["tls_per_s"] = messages / hop["seconds"]
    result.figures["tls_cpu_ms_per_msg"] = hop["cpu_seconds"] * 1000 / messages
    result.extra.update(pool_size=pool_size, aiosmtplib=sent["version"])
    if size == INTAKE_SIZE:
        received = _child({"part": "receive", "sessions": sessions, **job})
        result.figures["accepted_per_s"] = messages / received["seconds"]
        result.figures["intake_cpu_ms_per_msg"] = received["cpu_seconds"] * 1000 / messages
        result.figures["libraries_cpu_ms_per_msg"] = \
            result.figures["cpu_ms_per_msg"] + result.figures["intake_cpu_ms_per_msg"]
        result.extra["aiosmtpd"] = received["version"]
    return result


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one part in a child process (the job on its standard input: the upstream's
    password stays off its command line); what it measured."""
    command = [sys.executable, "-m", "bench.library"]
    child = subprocess.run(command, cwd=ROOT, input=json.dumps(job), capture_output=True,
                           text=True, timeout=time_limit(job["messages"]))
    if child.returncode != 0:
        raise MeasurementError(f"bench.library {job['part']} exited with {child.returncode}: "
                               f"{child.stderr.strip()[-500:]}")
    figures: dict[str, Any] = json.loads(child.stdout)
    return figures


def _wait_for(upstream: Upstream, messages: int) -> None:
    wait_for(lambda: upstream.received() >= messages, time_limit(messages),
             f"{upstream.name} counting {messages} messages")


def _usage() -> float:
    """This process's CPU seconds, counted as for the systems under test (bench.procstat:
    the larger of the ticks and the scheduler's count)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return max(usage.ru_utime + usage.ru_stime, runtime_seconds(os.getpid()))


async def _send(job: dict[str, Any]) -> dict[str, Any]:
    import aiosmtplib

    tls = job.get("tls")

    async def session() -> aiosmtplib.SMTP:
        context = None if tls is None else ssl.create_default_context(cafile=tls["ca_file"])
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=job["port"],
                                 start_tls=tls is not None, tls_context=context,
                                 local_hostname="bench.example.com")
        await client.connect()  # with STARTTLS (and EHLO again) when asked
        if tls is not None:
            await client.auth_plain(tls["username"], tls["password"])
        return client

    async def send(client: aiosmtplib.SMTP) -> None:
        while todo:
            todo.pop()
            await client.mail(SENDER)
            await client.rcpt(RECIPIENT)
            await client.data(data)

    data, todo = message(job["size"]), list(range(job["messages"]))
    clients = await asyncio.gather(*(session() for _ in range(job["sessions"])))
    cpu, started = _usage(), time.perf_counter()
    await asyncio.gather(*(send(client) for client in clients))
    seconds, cpu = time.perf_counter() - started, _usage() - cpu
    await asyncio.gather(*(client.quit() for client in clients))
    return {"seconds": seconds, "cpu_seconds": cpu, "version": aiosmtplib.__version__}


async def _receive(job: dict[str, Any]) -> dict[str, Any]:
    import aiosmtpd
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Answer:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            return "250 OK"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Answer(), hostname="bench.example.com"),
                                      "127.0.0.1", 0, backlog=job["sessions"] * 10)
    port = server.sockets[0].getsockname()[1]
    cpu, started = _usage(), time.perf_counter()
    source = await asyncio.create_subprocess_exec(
        *smtp_source_command(port, job["messages"], job["size"], job["sessions"]),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    if await source.wait() != 0:
        raise SystemExit(f"smtp-source exited with {source.returncode}")
    seconds, cpu = time.perf_counter() - started, _usage() - cpu
    server.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "version": aiosmtpd.__version__}


if __name__ == "__main__":
    job = json.load(sys.stdin)
    print(json.dumps(asyncio.run(_send(job) if job["part"] == "send" else _receive(job))))
