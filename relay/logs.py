"""Logging: one line per event on stderr, as text or JSON (`[log] level`, `format`).

Lines about a message start with its queue id ("0005C2F1A3B4D5E6F7A8B9C: queued ..."),
so `grep QUEUEID` finds its whole story; in JSON the id is also a field.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from relay.settings import LogSettings

_QUEUE_ID = re.compile(r"^([0-9A-F]{21}): ")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower()} " \
               f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(settings: LogSettings) -> None:
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_relay", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._relay = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root.setLevel(settings.level.upper())
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
