"""The spool: every accepted message on disk until the upstream has it. The
envelope, the one-file entry format, the commit path (`incoming`), the store's
claims, `removal` of delivered entries, `quarantine`, recovery, queue operations,
and the state directory (its lock and `write_atomically`, the one atomic write for
every other file the relay keeps).

It imports no network code and no settings: only errors and the standard library.
"""

from relay.spool.envelope import Envelope, Recipient, RecipientState, new_queue_id
from relay.spool.incoming import Incoming
from relay.spool.recovery import Recovery, recover
from relay.spool.store import INLINE_BYTES, Claimed, Place, Spool

__all__ = [
    "INLINE_BYTES",
    "Claimed",
    "Envelope",
    "Incoming",
    "Place",
    "Recipient",
    "RecipientState",
    "Recovery",
    "Spool",
    "new_queue_id",
    "recover",
]
