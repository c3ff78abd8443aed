"""A spool entry's envelope: sender, recipients and their states, attempts (the last
HISTORY of them with the server's reply); and queue ids.

Only the standard library: no settings, no network code, nothing else of the relay's.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

RecipientState = Literal["pending", "delivered", "failed"]


@dataclass
class Recipient:
    address: str
    state: RecipientState = "pending"
    reply: str | None = None
    options: list[str] = field(default_factory=list)


HISTORY = 20
"""How many attempts an envelope remembers (the latest); `attempts` counts them all."""


@dataclass
class Attempt:
    """One attempt that reached an answer: when it ended, through which server, and the
    server's reply (per recipient, "<a@b>: reply; ...", when they differed)."""

    at: float
    server: str
    reply: str


@dataclass
class Envelope:
    id: str
    sender: str
    """The client's MAIL FROM, before the rewrite ('' for the null sender)."""
    recipients: list[Recipient]
    mail_from: str | None = None
    """The system address the message goes out with; None until the account has one."""
    mail_options: list[str] = field(default_factory=list)
    received_at: float = field(default_factory=time.time)
    age_base: float = 0.0
    """Age for queue.max_age counts from here: receipt, or the last manual retry."""
    size: int = 0
    client: str = ""
    subject: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str | None = None
    crashes: int = 0
    dead_reason: str | None = None
    helo: str | None = None
    """The client's HELO/EHLO name, for the Received line added when the message is sent."""
    protocol: str = "ESMTP"
    """SMTP, ESMTP or UTF8SMTP: the `with` of that Received line."""
    as_received: bool = False
    """True: `message` holds the client's bytes, and the rewrite for the account as it is
    when the message is sent is applied on the way out. False: an entry written by an
    earlier version, whose `message` already holds the bytes to send."""
    history: list[Attempt] = field(default_factory=list)
    """The last HISTORY attempts, oldest first (empty in entries of earlier versions)."""

    def __post_init__(self) -> None:
        if not self.age_base:
            self.age_base = self.received_at

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == "pending"]

    def remember(self, at: float, server: str, replies: dict[str, str]) -> None:
        """Keep one attempt's replies (recipient -> reply), dropping the oldest beyond
        HISTORY. One reply for all recipients is kept once."""
        distinct = list(dict.fromkeys(replies.values()))
        reply = distinct[0] if len(distinct) == 1 else "; ".join(
            f"<{address}>: {text}" for address, text in replies.items())
        self.history = [*self.history, Attempt(at, server, reply)][-HISTORY:]

    def to_json(self) -> bytes:
        # The fields' own dicts, not dataclasses.asdict: its deep copy was most of the cost
        # of writing an envelope. ASCII escapes: always valid UTF-8 JSON, whatever bytes a
        # client put in an address.
        data = dict(vars(self))
        data["recipients"] = [vars(r) for r in self.recipients]
        data["history"] = [vars(a) for a in self.history]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """Parse and check an envelope; ValueError/TypeError/KeyError when it is not one."""
        data: dict[str, Any] = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        data["history"] = [Attempt(**a) for a in data.get("history", [])]
        env = cls(**data)
        if not env.id or not env.recipients:
            raise ValueError("no id or no recipients")
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(env, name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise ValueError(f"{name} has the wrong type ({type(value).__name__})")
        if not isinstance(env.as_received, bool):
            raise ValueError("as_received is not true or false")
        for attempt in env.history:
            if not (isinstance(attempt.at, int | float) and isinstance(attempt.server, str)
                    and isinstance(attempt.reply, str)):
                raise ValueError("an attempt in history is malformed")
        for rcpt in env.recipients:
            if (not isinstance(rcpt.address, str) or rcpt.state not in _STATES
                    or not isinstance(rcpt.options, list)):
                raise ValueError(f"recipient {rcpt.address!r} is malformed")
        return env


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "sender": str, "mail_options": list, "received_at": (int, float),
    "age_base": (int, float), "size": int, "client": str, "attempts": int,
    "next_attempt": (int, float), "crashes": int, "mail_from": (str, type(None)),
    "helo": (str, type(None)), "protocol": str,
}
_STATES = ("pending", "delivered", "failed")


_ID_BITS = random.Random()
"""Seeded from the operating system's randomness once; an id needs to be unique, not secret."""


def new_queue_id() -> str:
    """Sortable by arrival time, unique without coordination: 13 hex digits of µs + 8 random."""
    return f"{time.time_ns() // 1000:013X}{_ID_BITS.getrandbits(32):08X}"
