"""Read back what the private Postfix delivered: one Maildir, one file per recipient."""

from __future__ import annotations

import email
import email.policy
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path


@dataclass(frozen=True)
class Maildir:
    path: Path

    def messages(self) -> list[Path]:
        """Delivered files (new/ and cur/), oldest first."""
        files = [
            p
            for sub in ("new", "cur")
            if (self.path / sub).is_dir()
            for p in (self.path / sub).iterdir()
            if p.is_file()
        ]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def parsed(self) -> list[EmailMessage]:
        return [parse(p) for p in self.messages()]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Path]:
        """Wait until at least *count* messages are there; return them all.

        Raises TimeoutError (with what did arrive) if they don't come in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(found)} of {count} messages in {self.path} after {timeout} s"
                )
            time.sleep(0.02)

    def find(self, message_id: str, timeout: float = 10.0) -> list[EmailMessage]:
        """Wait for and return the delivered copies (one per recipient) of a Message-ID."""
        want = _bare(message_id)
        deadline = time.monotonic() + timeout
        while True:
            hits = [m for m in self.parsed() if _bare(str(m.get("Message-ID", ""))) == want]
            if hits or time.monotonic() > deadline:
                return hits
            time.sleep(0.02)

    def clear(self) -> None:
        for p in self.messages():
            p.unlink(missing_ok=True)


def parse(path: Path) -> EmailMessage:
    with path.open("rb") as f:
        msg = email.message_from_binary_file(f, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _bare(message_id: str) -> str:
    return message_id.strip().strip("<>")
