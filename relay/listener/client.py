"""A client of the relay's own listener: `send-test`, and what `sendmail` builds on.

It speaks SMTP to the listener (smtplib), as any application does, so what it
proves is the live path: `submit` and `transactions` hand a message over and
name what was refused; `wait_for_outcome` follows a queued message in the spool
until it is delivered or failed. `sendmail_target` finds the listener for a
program run by any user, and `smtp_session` passes `sendmail -bs`'s SMTP dialogue
through to it. The sysexits(3) codes are here for the callers.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formataddr, make_msgid

from relay.errors import DamagedEntry, SubmitError
from relay.listener.submit_target import Target, listener_address
from relay.settings import Settings
from relay.spool.store import Spool

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE = 0, 64, 65, 67, 69
EX_SOFTWARE, EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 70, 74, 75, 77, 78




class Refused(SubmitError):
    """The listener answered a command with 4xx/5xx: `code` and the `stage` it refused."""

    def __init__(self, message: str, *, code: int, stage: str) -> None:
        self.code = code
        self.stage = stage
        super().__init__(message, temporary=code < 500)


def submit(settings: Settings, sender: str, recipients: list[str], data: bytes) -> str:
    """Send through the listener; return its reply to DATA ("250 2.0.0 OK queued as ID").

    Raises SubmitError naming what was refused or why the listener is unreachable.
    """
    host, port = listener_address(settings)
    replies, refused = transactions(host, port, sender, recipients, data)
    if refused:
        raise refused[0]
    return replies[-1]


def transactions(host: str, port: int, sender: str, recipients: Sequence[str], data: bytes,
                  mail_options: Sequence[str] = (), rcpt_options: Sequence[str] = ()
                  ) -> tuple[list[str], list[Refused]]:
    """One or more SMTP transactions for `recipients` over one connection.

    A recipient refused for good (5xx) is reported and the others get the message; a
    "452 too many recipients" ends the transaction there and the rest go in the next
    one (RFC 5321, 4.5.3.1.10). Returns the DATA replies and the permanent refusals;
    raises SubmitError when the listener is unreachable, breaks off or defers.
    """
    replies: list[str] = []
    refused: list[Refused] = []
    # SMTP lines end in CRLF: a local program writes LF, and smtplib dot-stuffs after any
    # LF while the listener removes the dots only after CRLF (RFC 5321, 4.5.2).
    data = _CRLF.sub(b"\r\n", data)
    try:
        with smtplib.SMTP(host, port, timeout=30, local_hostname="localhost") as client:
            client.ehlo()
            options = [o for o in mail_options if client.has_extn(_EXTENSION[o.split("=")[0]])]
            rcpt_opts = list(rcpt_options) if client.has_extn("dsn") else []
            pending = list(recipients)
            while pending:
                _expect(client.mail(sender, options), "the sender", "mail")
                accepted: list[str] = []
                while pending:
                    rcpt = pending[0]
                    code, text = client.rcpt(rcpt, rcpt_opts)
                    if code == 452 and accepted:
                        break  # the rest in the next transaction
                    pending.pop(0)
                    if code >= 500:
                        refused.append(Refused(f"the relay refused the recipient <{rcpt}>: "
                                               f"{code} {text.decode(errors='replace')}",
                                               code=code, stage="rcpt"))
                    else:
                        _expect((code, text), f"the recipient <{rcpt}>", "rcpt")
                        accepted.append(rcpt)
                if not accepted:
                    client.rset()
                    break
                replies.append(_expect(client.data(data), "the message", "data"))
    except smtplib.SMTPConnectError as e:
        raise Refused(f"the relay refused the connection: {e.smtp_code} "
                      f"{_text(e.smtp_error)}", code=e.smtp_code, stage="connect") from None
    except smtplib.SMTPException as e:
        raise SubmitError(f"the relay broke off the dialogue: {e}", temporary=True) from None
    except UnicodeEncodeError:
        raise Refused("an address is not ASCII and the relay does not offer SMTPUTF8",
                      code=553, stage="mail") from None
    except OSError as e:
        raise SubmitError(f"cannot reach the relay's listener at {host}:{port}: {e}; "
                          "is `sysmail-relay serve` running?", temporary=True) from None
    return replies, refused


_CRLF = re.compile(rb"\r?\n")
_EXTENSION = {"BODY": "8bitmime", "SMTPUTF8": "smtputf8", "RET": "dsn", "ENVID": "dsn"}


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _expect(answer: tuple[int, bytes], what: str, stage: str) -> str:
    code, text = answer
    reply = f"{code} {text.decode(errors='replace')}"
    if code >= 400:
        raise Refused(f"the relay refused {what}: {reply}", code=code, stage=stage)
    return reply


def queue_id_of(reply: str) -> str | None:
    return reply.rsplit(" ", 1)[-1] if "queued as" in reply else None


def send_test(settings: Settings, to: str) -> str:
    msg = EmailMessage()
    msg["From"] = formataddr(("sysmail-relay test", settings.system_account.address or
                              "relay@localhost"))
    msg["To"] = to
    msg["Subject"] = "sysmail-relay test notification"
    msg["Message-ID"] = make_msgid(domain=socket.gethostname())
    msg.set_content(
        "This is a test notification sent with `sysmail-relay send-test`.\n"
        f"It went through the listener at {':'.join(map(str, listener_address(settings)))} "
        f"and the server {settings.system_account.server!r}.\n")
    return submit(settings, "", [to], msg.as_bytes())




def wait_for_outcome(settings: Settings, queue_id: str, timeout: float) -> tuple[str, str]:
    """Follow a queued message for at most `timeout` seconds: ("delivered" | "failed" |
    "waiting" | "unknown", what happened).

    Failed: a dead letter, or an entry damaged on disk (the daemon moves it to
    quarantine and never sends it). Unknown: this process cannot see the daemon's
    spool (another user, another state_dir)."""
    spool = Spool(settings.spool_dir)
    deadline = time.monotonic() + timeout
    if not (spool.root / "queue").is_dir():
        return "unknown", (f"there is no spool at {spool.root}: run this as the relay's user, "
                           "with its configuration (state_dir)")
    last = "no attempt finished yet"
    while True:
        try:
            found = spool.find(queue_id)
        except FileNotFoundError:  # it kept moving while it was looked at: look again
            pass
        except DamagedEntry as e:
            return "failed", ("damaged in the spool and not sent (the relay moves it to "
                              f"quarantine): {e}")
        except OSError as e:
            return "unknown", (f"cannot read the spool at {spool.root}: {e.strerror}; run this "
                               "as the relay's user")
        else:
            if found is None:
                reason = spool.quarantined(queue_id)
                if reason is not None:
                    return "failed", ("damaged in the spool, moved to quarantine and not sent: "
                                      f"{reason}")
                return "delivered", f"delivered through {settings.system_account.server!r}"
            place, env = found
            if place == "dead":
                return "failed", env.dead_reason or "dead letter"
            last = env.last_reply or last
        left = deadline - time.monotonic()
        if left <= 0:
            return "waiting", f"not delivered yet: {last}"
        time.sleep(min(0.1, left))


_BS_LINGER = 10.0
"""-bs: seconds to wait for the listener's last replies once input ended without QUIT."""


def smtp_session(target: Target, stdin: int = 0, stdout: int = 1) -> int:
    """-bs: the program speaks SMTP on our standard input and output; the listener answers.

    Bytes are passed through unchanged both ways, so the program sees the listener's
    own replies (and its "250 ... queued as" only once the message is on disk).
    """
    try:
        sock = socket.create_connection((target.host, target.port), timeout=30)
    except OSError as e:
        os.write(stdout, f"421 4.3.0 sysmail-sendmail: cannot reach the relay's listener at "
                         f"{target.host}:{target.port}: {e.strerror or e}\r\n".encode())
        return EX_TEMPFAIL
    sock.settimeout(1.0)
    ended = threading.Event()

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(stdin, 65536):
                sock.sendall(chunk)
        ended.set()  # no half-close: the listener would drop what it has not answered yet

    threading.Thread(target=upstream, daemon=True).start()
    quiet = 0.0
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                quiet = quiet + 1.0 if ended.is_set() else 0.0
                if quiet >= _BS_LINGER:  # input ended without QUIT: stop waiting
                    break
                continue
            if not chunk:
                break
            quiet = 0.0
            view = memoryview(chunk)
            while view:
                view = view[os.write(stdout, view):]
    except OSError as e:
        print(f"sendmail: the SMTP session ended: {e}", file=sys.stderr)
        return EX_IOERR
    finally:
        sock.close()
    return EX_OK
