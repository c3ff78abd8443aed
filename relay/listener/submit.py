"""Handing messages to the relay's own listener: `send-test` and `sendmail`, in one
name for their callers (the CLI, the admin page).

Where the listener is comes from relay.listener.submit_target (the configuration,
else the running daemon's lock file); the client side is relay.listener.client
(SMTP to the listener, the spool followed for `send-test --wait`, `sendmail -bs`);
the sendmail(8) command line and its message are relay.listener.sendmail. None
loads daemon, HTTP or OAuth code (pyproject.toml's import contracts).
"""

from relay.listener.client import (
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Refused,
    queue_id_of,
    send_test,
    smtp_session,
    submit,
    transactions,
    wait_for_outcome,
)
from relay.listener.sendmail import (
    SendmailArgs,
    default_sender,
    parse_sendmail_args,
    read_message,
    recipients_of,
    sendmail,
)
from relay.listener.submit_target import Target, listener_address, sendmail_target

__all__ = [
    "EX_CONFIG", "EX_DATAERR", "EX_IOERR", "EX_NOPERM", "EX_NOUSER", "EX_OK", "EX_SOFTWARE",
    "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE", "Refused", "SendmailArgs", "Target",
    "default_sender", "listener_address", "parse_sendmail_args", "queue_id_of",
    "read_message", "recipients_of", "send_test", "sendmail", "sendmail_target",
    "smtp_session", "submit", "transactions", "wait_for_outcome",
]
