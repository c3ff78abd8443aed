"""Entries the relay itself could not handle: the spool refused (EIO, EACCES, ENOSPC)
or the relay has a bug.

Such an entry is put back as it was and waits with the backoff of a deferred message,
counted here in memory (the spool may not take a new attempt count). It is logged once
per entry and cause, with what to check, not at every try; a success ends it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("relay.delivery")


class Troubles:
    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}
        """Per entry: the cause, and the tries in a row."""

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._seen

    def forget(self, queue_id: str) -> None:
        self._seen.pop(queue_id, None)

    def record(self, queue_id: str, error: BaseException, what: str,
               backoff: Callable[[int], float], root: Path) -> float:
        """Count one more try of `queue_id` that failed with `error` while doing `what`;
        return how long it waits (`backoff` of the tries). Logged when the entry first
        meets this cause; `root` (the spool) is named in the advice for an OSError."""
        cause = f"{what}: {describe(error)}"
        previous, tries = self._seen.get(queue_id, ("", 0))
        self._seen[queue_id] = (cause, tries + 1)
        delay = backoff(tries + 1)
        if cause == previous:
            log.debug("%s: %s; tried again in %.0f s", queue_id, cause, delay)
            return delay
        fix = (f"check the file system of {root} (free space, the relay user's "
               "permissions, I/O errors in the kernel log)" if isinstance(error, OSError)
               else "please report this with the log")
        log.error("%s: %s; the message stays in the queue and is tried again in %.0f s, then "
                  "with growing delays (logged again when the cause changes); %s", queue_id,
                  cause, delay, fix, exc_info=None if isinstance(error, OSError) else error)
        return delay


def describe(error: BaseException) -> str:
    if isinstance(error, OSError):
        name = errno.errorcode.get(error.errno or 0, "")
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{f' [{name}]' if name else ''}{where}"
    return repr(error)
