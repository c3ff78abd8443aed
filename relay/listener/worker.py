"""One intake worker process: `python -m relay.listener.worker`, started by the parent
(relay.listener.workers), never by hand.

It accepts on the listening socket(s) it inherits, runs its own event loop, aiosmtpd
server and group commit into the spool, and tells the parent about what it queued.
Its arguments are file descriptors the parent passed: the channel (a unix stream
socket), the shared connection slots, and the listening sockets; then its place
among the slots and the drain time.

The channel. Parent to worker: frames of a 4-byte length and a pickle: a
`Settings` (the first at start, one more per reload: applied to the sessions that
start after it, as in one process), or SERVE (accept from now on: the parent says so
once every worker is ready, so the port answers only when the daemon does). Worker
to parent: JSON lines, `{"ready": [host, port]}` once it listens, `{"serving":
true}` once it accepts, then
`{"queued": [[id, due, age_base], ...]}`, one write per group commit (all the
messages its batch made durable), written before their clients get 250. The parent
trusts its own pickles; the worker, which talks to the network, sends only JSON.
The worker also inherits the state directory's lock (it holds it with the parent,
until it has ended) and never touches it.

SIGTERM, or the channel's end (the parent is gone): stop accepting, finish the
sessions in flight (up to the drain time), commit, exit 0. SIGINT and SIGHUP are
the parent's to act on (a terminal sends them to every process of its group).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Callable

from relay import logs
from relay.listener.server import Listener
from relay.listener.slots import SharedSlots
from relay.metrics import IntakeMetrics
from relay.settings import Settings
from relay.spool import Envelope, Spool

log = logging.getLogger("relay.listener")

FRAME = struct.Struct("!I")
SERVE = "serve"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop `serve` and the workers run on (setting `event_loop`, checked by
    Settings).

    uvloop carries the same load with a little less CPU, but its '.' to 250 p99
    under load is about twice asyncio's (docs/performance.md), so it is not the default.
    """
    if choice == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def frame(message: Settings | str) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Settings | str:
    """The parent's next message; IncompleteReadError at the channel's end."""
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    message = pickle.loads(await reader.readexactly(size))
    assert isinstance(message, Settings | str)
    return message


class Worker:
    def __init__(self, channel: socket.socket, slots: SharedSlots,
                 listening: list[socket.socket], grace: float) -> None:
        self.channel = channel
        self.slots = slots
        self.listening = listening
        self.grace = grace
        self.listener: Listener | None = None
        self._pending: list[tuple[str, float, float]] = []
        self._channel_out: asyncio.StreamWriter | None = None
        self._stop = asyncio.Event()

    async def run(self, settings: Settings) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        reader, self._channel_out = await asyncio.open_unix_connection(sock=self.channel)
        spool = Spool(settings.spool_dir)  # opened and recovered by the parent
        self.listener = Listener(settings, spool, IntakeMetrics(), self._queued, self.slots)
        await self.listener.start(self.listening, serving=False)
        self._send({"ready": self.listener.address})
        reading = asyncio.create_task(self._read(reader), name="channel")
        await self._stop.wait()
        self.listener.stop_accepting()
        await self.listener.drain(self.grace)
        await asyncio.to_thread(spool.close)
        reading.cancel()
        self._flush()
        with contextlib.suppress(OSError):
            await self._channel_out.drain()
        self._channel_out.close()
        return 0

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await read_frame(reader)
            except (asyncio.IncompleteReadError, OSError):
                log.warning("the relay's main process is gone: finishing the sessions in "
                            "flight, then exiting")
                self._stop.set()
                return
            assert self.listener is not None
            if message == SERVE:
                await self.listener.serve()
                self._send({"serving": True})
            elif isinstance(message, Settings):
                self.listener.settings = message
                logs.configure(message.log, process=True)

    def _queued(self, env: Envelope) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((env.id, env.next_attempt, env.age_base))

    def _flush(self) -> None:
        if self._pending and self._channel_out is not None:
            self._send({"queued": self._pending})
            self._pending = []

    def _send(self, message: object) -> None:
        assert self._channel_out is not None
        if not self._channel_out.is_closing():
            self._channel_out.write(json.dumps(message).encode() + b"\n")


def main(argv: list[str]) -> int:
    """argv: CHANNEL_FD SLOTS_FD PLACE GRACE LISTEN_FD..."""
    channel_fd, slots_fd, place = (int(a) for a in argv[:3])
    grace = float(argv[3])
    os.umask(0o077)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = socket.socket(fileno=channel_fd)
    listening = [socket.socket(fileno=int(fd)) for fd in argv[4:]]
    worker = Worker(channel, SharedSlots(slots_fd, place), listening, grace)
    # The first settings say which event loop to run: read before it starts.
    channel.settimeout(30)
    try:
        (size,) = FRAME.unpack(_recv_exactly(channel, FRAME.size))
        settings = pickle.loads(_recv_exactly(channel, size))
    except (OSError, ValueError):
        return 1  # the parent went away before it said anything
    assert isinstance(settings, Settings)
    channel.setblocking(False)
    logs.configure(settings.log, process=True)
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(worker.run(settings))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("the channel ended")
        data += chunk
    return data


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
