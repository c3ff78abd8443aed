"""An upstream SMTP server that misbehaves on purpose, run as its own process.

    python -m tests.faulty_upstream --journal FILE [--fault-rate 0.4] [--stall 3] [--seed N]

It is aiosmtpd offering PIPELINING on 127.0.0.1 (port 0 unless --port), in a
process of its own so that it outlives every kill -9 of the relay. It prints
`ready PORT` on stdout once it listens. For each transaction (decided at MAIL) it
either behaves, or, with probability --fault-rate, injects one fault:

    tempfail-mail   451 4.3.0 to MAIL FROM
    tempfail-rcpt   450 4.2.1 to RCPT TO
    tempfail-data   451 4.3.0 after the final dot (the message is not taken)
    drop-data       354, reads a few bytes of the message, then hangs up (mid-DATA)
    stall-rcpt      says nothing to RCPT TO for --stall seconds (past the relay's
                    timeout), then hangs up
    stall-data      says nothing after the final dot for --stall seconds, then hangs up
                    (the message is not taken)
    late-accept     takes the message after the final dot but answers 250 only after
                    --stall seconds: the relay has given up by then and sends it again,
                    so this one is a duplicate by design (RFC 5321 section 6.1)

Every message it takes is journaled (`accepted <Message-ID> BODY-SHA256-PREFIX`,
one write(2) per line, O_APPEND) before it answers, and every fault as `fault KIND`. SIGUSR1
switches the faults off, SIGUSR2 on again; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

FAULTS = ("tempfail-mail", "tempfail-rcpt", "tempfail-data", "drop-data", "stall-rcpt",
          "stall-data", "late-accept")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.I | re.M)


def body_digest(content: bytes) -> str:
    """First 16 hex digits of the SHA-256 of the body (what follows the header section)."""
    return hashlib.sha256(content.partition(b"\r\n\r\n")[2]).hexdigest()[:16]


def message_id(content: bytes) -> str:
    """The Message-ID of a message (from its header section), or '(none)'."""
    head = content.split(b"\r\n\r\n", 1)[0]
    found = _MESSAGE_ID.search(head)
    return found.group(1).decode("ascii", "replace") if found else "(none)"


class Faults:
    """The server's state: which fault is on, the journal, the random source."""

    def __init__(self, journal: str, rate: float, stall: float, seed: int | None,
                 kinds: tuple[str, ...] = FAULTS) -> None:
        self.fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rate = rate
        self.kinds = kinds
        self.stall = stall
        self.enabled = True
        self.rng = random.Random(seed)

    def note(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def pick(self) -> str | None:
        if not self.enabled or self.rng.random() >= self.rate:
            return None
        return self.rng.choice(self.kinds)


class FaultySMTP(SMTP):
    """aiosmtpd's SMTP with one fault (or none) per transaction."""

    def __init__(self, faults: Faults, **kwargs: Any) -> None:
        super().__init__(_Handler(faults), **kwargs)
        self.faults = faults
        self.fault: str | None = None

    def _hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.fault = self.faults.pick()
        if self.fault is not None:
            self.faults.note(f"fault {self.fault}")
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if self.fault == "drop-data" and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.read(self.faults.rng.randrange(1, 400)), 2)
            self._hang_up()
            return
        await super().smtp_DATA(arg)


class _Handler:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    async def handle_EHLO(self, server: FaultySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """Offers PIPELINING, as the servers the relay sends to do (aiosmtpd reads
        pipelined commands but does not say so): the relay then sends each message's
        MAIL, RCPT and DATA together, and the faults hit that."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(self, server: FaultySMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if server.fault == "tempfail-mail":
            return "451 4.3.0 Temporary failure, try again (injected)"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: FaultySMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if server.fault == "tempfail-rcpt":
            return "450 4.2.1 Mailbox busy, try again (injected)"
        if server.fault == "stall-rcpt":
            await asyncio.sleep(self.faults.stall)
            server._hang_up()
            return "421 4.4.2 stalled (injected)"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: FaultySMTP, session: Session,
                          envelope: Envelope) -> str:
        if server.fault == "tempfail-data":
            return "451 4.3.0 Queue write failed, try again (injected)"
        if server.fault == "stall-data":
            await asyncio.sleep(self.faults.stall)
            server._hang_up()
            return "421 4.4.2 stalled (injected)"
        content = envelope.original_content
        assert isinstance(content, bytes)
        self.faults.note(f"accepted {message_id(content)} {body_digest(content)}")
        if server.fault == "late-accept":
            await asyncio.sleep(self.faults.stall)
        return "250 2.0.0 OK taken"


async def serve(faults: Faults, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FaultySMTP(faults, hostname="faulty.upstream.test", loop=loop,
                           enable_SMTPUTF8=True),
        "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(faults, "enabled", False))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(faults, "enabled", True))
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--journal", required=True, help="file to append accepted/fault lines to")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.4)
    parser.add_argument("--stall", type=float, default=3.0, help="seconds (past the timeout)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="comma-separated kinds to choose from (default: all)")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    unknown = set(kinds) - set(FAULTS)
    if unknown or not kinds:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    faults = Faults(args.journal, args.fault_rate, args.stall, args.seed, kinds)
    asyncio.run(serve(faults, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
