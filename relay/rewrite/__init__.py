"""The rewrite: a message's bytes, made to have the system address as their sender.

Pure: the client's bytes and the account's values in, the bytes to send out; it
imports nothing of ours (an import-linter contract). Only the header block is
parsed; every other byte (body, the other header fields, their order, folding,
line endings, 8-bit content, a missing final line ending) is kept. Every function
here is linear in the size of its input.

- relay.rewrite.parse: the header block split as receiving servers split it;
- relay.rewrite.sender: the edits (one From for the system address, Reply-To,
  Sender removed, Date and Message-ID added): `rewrite_message`, `rewrite_head`;
- relay.rewrite.trace: the Received line and the Date value;
- relay.rewrite.decode: a header's value for people (`header_value`).
"""

from relay.rewrite.decode import VALUE_LIMIT, header_value
from relay.rewrite.parse import Header, split_header
from relay.rewrite.sender import RewriteArguments, rewrite_head, rewrite_message, rewrite_parts
from relay.rewrite.trace import date_header_value, received_header

__all__ = [
    "VALUE_LIMIT",
    "Header",
    "RewriteArguments",
    "date_header_value",
    "header_value",
    "received_header",
    "rewrite_head",
    "rewrite_message",
    "rewrite_parts",
    "split_header",
]
