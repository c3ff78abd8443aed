"""The message as one attempt sends it: the client's bytes with the rewrite for the
system account as it is at that attempt.

An entry that holds the client's bytes gets the rewrite (relay.rewrite) for the
current account: MAIL FROM and From are the current system address, so held mail
follows an address changed meanwhile. Received, Date and Message-ID are built from
the envelope (queue id, client, HELO, time of receipt), so every attempt of one
message sends the same ones. A message up to `relay.spool.INLINE_BYTES` is
rewritten in memory; of a larger one only the header block is read (in growing
chunks, from a thread) and the body is sent from the file. An entry written by an
earlier version is sent as stored.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relay.errors import TemporaryFailure
from relay.rewrite import (
    RewriteArguments,
    date_header_value,
    received_header,
    rewrite_head,
    rewrite_message,
)
from relay.settings import Settings
from relay.spool import Claimed, Envelope
from relay.upstream.base import Outgoing

_HEAD_CHUNK = 1 << 16
"""The first read of a large message's header block (then twice as much each time)."""


async def outgoing(claimed: Claimed, settings: Settings) -> Outgoing:
    """The message as it is sent now. An entry that holds the client's bytes gets the
    rewrite for the system account as it is at this attempt (held mail follows a changed
    address); Date, Message-ID and Received come from the envelope, so every attempt
    sends the same ones. An entry written by an earlier version is sent as stored.
    The message begins at `claimed.start` in its file (after the entry's header)."""
    env, path, data, start = claimed.envelope, claimed.path, claimed.data, claimed.start
    if not env.as_received:
        return Outgoing(env, path, env.mail_from or "", env.pending, data,
                        offset=0 if data is not None else start)
    edit = _edit(env, settings)
    if data is not None:
        return Outgoing(env, path, edit.address, env.pending, rewrite_message(
            data, **edit.arguments))
    try:
        head, offset = await asyncio.to_thread(_read_head, path, edit, start)
    except OSError as e:
        raise TemporaryFailure(f"cannot read {path}: {e.strerror}", stage="spool") from e
    return Outgoing(env, path, edit.address, env.pending, head=head, offset=start + offset)


@dataclass(frozen=True)
class _Edit:
    """What the rewrite of one entry needs: the current account and the entry's trace."""

    address: str
    arguments: RewriteArguments


def _edit(env: Envelope, settings: Settings) -> _Edit:
    account = settings.system_account
    by_host = settings.listener.hostname or socket.gethostname()
    when = datetime.fromtimestamp(int(env.received_at), UTC).astimezone()
    domain = account.address.rpartition("@")[2] if account.address else by_host
    received = received_header(helo=env.helo, peer_ip=env.client or "unknown", by_host=by_host,
                               queue_id=env.id, recipients=[r.address for r in env.recipients],
                               when=when, with_protocol=env.protocol)
    return _Edit(account.address or "", RewriteArguments(
        system_address=account.address or "", received=received,
        from_header=account.from_header if account.address else "keep",
        message_id=f"<{env.id}@{domain}>", date=date_header_value(when)))


def _read_head(path: Path, edit: _Edit, start: int = 0) -> tuple[bytes, int]:
    """The rewritten header block of a large message (which begins at `start` in the file)
    and where its body starts after `start`, reading the header block only, in chunks
    (each twice the last: linear work)."""
    chunks: list[bytes] = []
    size = _HEAD_CHUNK
    with path.open("rb") as f:
        f.seek(start)
        while True:
            chunk = f.read(size)
            chunks.append(chunk)
            prefix = b"".join(chunks)
            found = rewrite_head(prefix, complete=not chunk, **edit.arguments)
            if found is not None:
                return found
            chunks = [prefix]
            size *= 2
