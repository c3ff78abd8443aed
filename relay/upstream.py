"""The network edge: what a delivery hands a message to.

`Upstream` is the one interface the scheduler knows. Implementations: the
built-in `local` outbox (relay.outbox) and SMTP servers. `deliver()` returns one
`Outcome` per recipient, or raises TemporaryFailure / PermanentFailure when the
whole message failed (connection, timeout, authentication, DATA refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import DeliveryFailure
from .spool import Envelope, Recipient


@dataclass(frozen=True)
class Outgoing:
    """One message to send: its envelope, the file with its bytes, the sender to announce."""

    envelope: Envelope
    path: Path
    mail_from: str
    recipients: list[Recipient]


@dataclass(frozen=True)
class Outcome:
    """The upstream's answer for one recipient: accepted when `failure` is None."""

    recipient: str
    reply: str
    failure: DeliveryFailure | None = None


class Upstream(Protocol):
    name: str

    async def deliver(self, message: Outgoing) -> list[Outcome]:
        """Hand over one message; raise TemporaryFailure/PermanentFailure for all of it."""
        ...

    async def close(self) -> None:
        """Close idle sessions; called on reload and shutdown."""
        ...
