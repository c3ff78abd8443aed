"""The upstream: Postfix's smtp-sink, counting what it received.

`smtp-sink -c` writes a running counter ("sess=N quit=N mesg=N", one per event,
flushed at once) to its stdout, which tests.peers.smtp_sink sends to a log file;
`received()` reads what was added since the last call and returns the latest
`mesg=` value. (`-M count` would stop the sink at the count, but it exits before
answering the last message, which the relay under test would then retry.)
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType

from bench.procstat import tree_cpu_seconds
from tests.peers import smtp_sink

_COUNTER = re.compile(rb"mesg=(\d+)")
_TAIL = 64  # bytes kept between reads: a counter split across two reads is still found


class CountingSink:
    name = "smtp-sink"

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self._sink = smtp_sink.start(log_file, extra_args=("-c",))
        self._offset = 0
        self._carry = b""
        self._count = 0

    def __enter__(self) -> CountingSink:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._sink.port

    def exit_status(self) -> int | None:
        """None while it runs; else its exit code (negative: the signal that ended it)."""
        return self._sink.process.poll()

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self._sink.process.pid)

    def received(self) -> int:
        """Messages received so far (a "." seen), as smtp-sink counts them."""
        with self.log_file.open("rb") as log:
            log.seek(self._offset)
            new = log.read()
        self._offset += len(new)
        window = self._carry + new
        found = _COUNTER.findall(window)
        if found:
            self._count = max(self._count, int(found[-1]))
        self._carry = window[-_TAIL:]
        return self._count

    def stop(self) -> None:
        self._sink.stop()
