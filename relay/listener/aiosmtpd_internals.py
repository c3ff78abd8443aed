"""Everything the listener takes from aiosmtpd beyond its documented extension points.

aiosmtpd documents handler hooks (handle_EHLO, handle_MAIL, handle_RCPT, ...) and
subclassing `SMTP` to add or replace `smtp_*` commands; the rest of relay.listener
uses only those and aiosmtpd's public attributes. Four things cannot be done
through them, and live here alone:

- **Streaming DATA.** aiosmtpd's own `smtp_DATA` collects the whole message in
  memory; the relay's replacement (relay.listener.protocol) reads the session's
  stream, which aiosmtpd keeps as `SMTP._reader` (`stream_of`).
- **Parsing MAIL and RCPT addresses cheaply.** aiosmtpd parses them with the email
  package (`SMTP._getaddr`, about 190 µs a call); `Shortcuts` answers the plain
  `<local@domain>` form itself (3 µs) with the same result.
- **An idle timer per session, not per command.** aiosmtpd cancels its timer and
  schedules a new one for every command (`SMTP._reset_timeout`); each cancelled
  timer stays in the event loop's heap, and keeping that heap in order (in Python)
  cost about a fifth of intake's CPU at 1 KiB. `Shortcuts` keeps one timer that,
  when it fires early, waits out the rest; on expiry it calls aiosmtpd's
  `_timeout_cb`, which closes the connection.
- **Setting up a session cheaply.** For every connection, `SMTP.__init__` finds
  commands, AUTH mechanisms and hooks with dir() and inspect.getmembers() over every
  attribute of the protocol and the handler, and reads handle_EHLO's signature:
  about 3/4 of a connection's set-up. `Shortcuts.__dir__` and `quick_hooks` give it
  only the names it can use (they depend on the class alone) and a ready signature.

`PRIVATE_NAMES` lists each private name this relies on and `RELIED_ON` the
behaviours; tests/listener/test_aiosmtpd_internals.py checks both against the
installed aiosmtpd and fails naming what is missing, and pyproject.toml pins
aiosmtpd below 1.5 while this module exists. No other module of relay/ touches an
aiosmtpd private name (the same test checks that).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP

from relay.listener.addresses import plain_angle_addr

PRIVATE_NAMES: dict[str, str] = {
    "SMTP._reader": "the session's asyncio.StreamReader, set when the connection is made; "
                    "DATA is read from it (stream_of)",
    "SMTP._getaddr": "method (self, arg) -> (address or None, the rest or None); "
                     "Shortcuts answers the plain form before it",
    "SMTP._reset_timeout": "method (self, duration=None), called by aiosmtpd for every "
                           "command; Shortcuts replaces it",
    "SMTP._timeout_handle": "the idle timer (an asyncio.TimerHandle or None) that "
                            "connection_lost cancels",
    "SMTP._timeout_duration": "the idle timeout in seconds, from SMTP(timeout=...)",
    "SMTP._timeout_cb": "method (self) that closes the connection of an idle client",
}
"""Each private name of aiosmtpd's `SMTP` this module relies on, and what for."""

RELIED_ON: dict[str, str] = {
    "dir": "SMTP.__init__ finds smtp_* and auth_* methods and the handler's handle_* hooks "
           "by their names in dir() (Shortcuts.__dir__, quick_hooks)",
    "signature": "SMTP.__init__ tells the form of handle_EHLO by inspect.signature() "
                 "(quick_hooks)",
}
"""Behaviours of aiosmtpd's `SMTP` this module relies on."""

_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """What aiosmtpd looks for by name on `cls` (it depends on the class alone)."""
    key = (cls, prefixes)
    if key not in _NAMES:
        _NAMES[key] = sorted(name for name in dir(cls) if name.startswith(prefixes))
    return _NAMES[key]


def stream_of(server: SMTP) -> asyncio.StreamReader:
    """The stream a session reads the client's bytes from (aiosmtpd's `_reader`)."""
    reader: asyncio.StreamReader = server._reader
    return reader


class Shortcuts(SMTP):
    """aiosmtpd's SMTP, set up and parsing addresses faster, with the same results."""

    def __dir__(self) -> list[str]:
        return _names(type(self), ("smtp_", "auth_"))

    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timeout, without a new timer for every command: a timer that
        fires no later than the deadline stays, and on firing waits out the rest."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is not None and not timer.cancelled() and timer.when() <= self._deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self._deadline - self.loop.time() > 0.001:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
        else:
            self._timeout_cb()  # type: ignore[no-untyped-call]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = plain_angle_addr(arg)
        if plain is None or (self.local_part_limit and
                             len(plain[0].rpartition("@")[0]) > self.local_part_limit):
            return super()._getaddr(arg)
        return plain


_Handler = TypeVar("_Handler", bound=type)


def quick_hooks(cls: _Handler) -> _Handler:
    """A handler class that aiosmtpd sets up faster for each session: dir() lists only
    its hooks, and handle_EHLO's signature is ready."""

    def __dir__(self: Any) -> list[str]:
        return _names(type(self), ("handle_",))

    cls.__dir__ = __dir__  # type: ignore[assignment]
    ehlo: Callable[..., Any] | None = getattr(cls, "handle_EHLO", None)
    if ehlo is not None:
        ehlo.__signature__ = inspect.signature(ehlo)  # type: ignore[attr-defined]
    return cls
