"""Facts from the private Postfix's log (maillog_file): queue ids, SASL method, replies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_QUEUE_ID = r"[0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}"
_MESSAGE_ID = re.compile(rf"\b({_QUEUE_ID}): message-id=<?([^>\s]*)>?")
_CLIENT = re.compile(
    rf"\b({_QUEUE_ID}): client=\S+?(?:, sasl_method=([^,\s]+))?(?:, sasl_username=(\S+))?$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class SaslLogin:
    queue_id: str
    method: str | None  # e.g. "DIGEST-MD5"; None: the message came without AUTH
    username: str | None


@dataclass(frozen=True)
class PostfixLog:
    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def queue_ids(self, message_id: str) -> list[str]:
        """Queue ids whose cleanup line names this Message-ID (with or without <>)."""
        want = message_id.strip().strip("<>")
        return [qid for qid, mid in _MESSAGE_ID.findall(self.text()) if mid == want]

    def sasl_login(self, message_id_or_queue_id: str) -> SaslLogin | None:
        """The smtpd ``client=... sasl_method=...`` line for a message, or None if not logged.

        Accepts a queue id or a Message-ID (looked up via the cleanup log line);
        for a Message-ID sent more than once, the latest queue id wins.
        """
        key = message_id_or_queue_id.strip()
        qids = self.queue_ids(key) or [key]
        found: SaslLogin | None = None
        for qid, method, user in _CLIENT.findall(self.text()):
            if qid in qids:
                found = SaslLogin(qid, method or None, user or None)
        return found

    def sasl_method(self, message_id_or_queue_id: str) -> str | None:
        login = self.sasl_login(message_id_or_queue_id)
        return login.method if login else None
