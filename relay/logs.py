"""Logging: one line per event on stderr, as text or JSON (`[log] level`, `format`).

Lines about a message start with its queue id ("0005C2F1A3B4D5E6F7A8B9C: queued ..."),
so `grep QUEUEID` finds its whole story; in JSON the id is also a field. An intake
worker's lines name it with its pid: "relay.listener[4242]: ..." (JSON: "pid").
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

from relay.settings import LogSettings

_QUEUE_ID = re.compile(r"^([0-9A-F]{21}): ")


class TextFormatter(logging.Formatter):
    def __init__(self, process: bool = False) -> None:
        super().__init__()
        self.process = f"[{os.getpid()}]" if process else ""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower()} " \
               f"{record.name}{self.process}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, process: bool = False) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if m := _QUEUE_ID.match(message):
            entry["queue_id"] = m.group(1)
        if self.process:
            entry["pid"] = record.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(settings: LogSettings, process: bool = False) -> None:
    """`process`: name this process in every line (an intake worker)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_relay", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._relay = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter(process) if settings.format == "json"
                         else TextFormatter(process))
    root.setLevel(settings.level.upper())
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
