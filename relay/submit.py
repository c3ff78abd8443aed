"""Handing messages to the relay's own listener: `send-test` and `sendmail`.

Both speak SMTP to the listener, as any application does, so what they prove is
the live path. `sendmail` follows the sendmail(8) conventions that programs rely
on (-t, -i/-oi, -f, -F, recipients as arguments) and exits with sysexits codes.
"""

from __future__ import annotations

import smtplib
import socket
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formataddr, getaddresses, make_msgid

from .errors import DamagedEntry, SubmitError
from .settings import Settings
from .spool import Spool

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE = 0, 64, 65, 67, 69
EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 70, 75, 78


def listener_address(settings: Settings) -> tuple[str, int]:
    host = settings.listener.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return host, settings.listener.port


def submit(settings: Settings, sender: str, recipients: list[str], data: bytes) -> str:
    """Send through the listener; return its reply to DATA ("250 2.0.0 OK queued as ID").

    Raises SubmitError naming what was refused or why the listener is unreachable.
    """
    host, port = listener_address(settings)
    try:
        with smtplib.SMTP(host, port, timeout=30, local_hostname="localhost") as client:
            client.ehlo()
            _expect(client.mail(sender), "the sender")
            for rcpt in recipients:
                _expect(client.rcpt(rcpt), f"the recipient <{rcpt}>")
            code, text = client.data(data)
            return _expect((code, text), "the message")
    except smtplib.SMTPException as e:
        raise SubmitError(f"the relay broke off the dialogue: {e}", temporary=True) from None
    except OSError as e:
        raise SubmitError(f"cannot reach the relay's listener at {host}:{port}: {e}; "
                          "is `sysmail-relay serve` running?", temporary=True) from None


def _expect(answer: tuple[int, bytes], what: str) -> str:
    code, text = answer
    reply = f"{code} {text.decode(errors='replace')}"
    if code >= 400:
        raise SubmitError(f"the relay refused {what}: {reply}", temporary=code < 500)
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


@dataclass
class SendmailArgs:
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False   # -t
    ignore_dots: bool = False    # -i / -oi
    sender: str | None = None    # -f
    full_name: str | None = None  # -F


def parse_sendmail_args(argv: list[str]) -> SendmailArgs:
    """sendmail(8)'s options as programs pass them. Raises ValueError on what we cannot do."""
    args = SendmailArgs()
    it = iter(argv)
    for arg in it:
        if arg == "--":
            args.recipients.extend(it)
            break
        if arg in ("-t",):
            args.from_headers = True
        elif arg in ("-i", "-oi"):
            args.ignore_dots = True
        elif arg.startswith("-f") or arg.startswith("-r"):
            args.sender = arg[2:] or next(it, "")
        elif arg.startswith("-F"):
            args.full_name = arg[2:] or next(it, "")
        elif arg in ("-bm", "-om", "-oem", "-oee", "-odi", "-odb", "-v") or arg.startswith("-o"):
            continue  # delivery modes and options that do not apply to a relay client
        elif arg.startswith("-"):
            raise ValueError(f"sendmail option {arg} is not supported")
        else:
            args.recipients.append(arg)
    return args


def read_message(stream: bytes, ignore_dots: bool) -> bytes:
    """Without -i a line holding a single '.' ends the message, as in sendmail(8)."""
    if ignore_dots:
        return stream
    lines = stream.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip(b"\r\n") == b".":
            return b"".join(lines[:i])
    return stream


def sendmail(settings: Settings, args: SendmailArgs, stdin: bytes) -> tuple[int, str]:
    data = read_message(stdin, args.ignore_dots)
    recipients = list(args.recipients)
    if args.from_headers:
        headers = BytesHeaderParser().parsebytes(data)
        fields = [str(v) for name in ("To", "Cc", "Bcc") for v in headers.get_all(name, [])]
        recipients += [addr for _, addr in getaddresses(fields) if addr]
        data = _drop_header(data, b"bcc")
    if not recipients:
        return EX_USAGE, "no recipients: name them as arguments or use -t"
    if args.full_name and not BytesHeaderParser().parsebytes(data).get("From"):
        sender = args.sender or settings.system_account.address or "relay@localhost"
        data = f"From: {formataddr((args.full_name, sender))}\r\n".encode() + data
    try:
        return EX_OK, submit(settings, args.sender or "", recipients, data)
    except SubmitError as e:
        return (EX_TEMPFAIL if e.temporary else EX_UNAVAILABLE), str(e)


def _drop_header(data: bytes, name: bytes) -> bytes:
    """Remove every occurrence of a header (and its folded lines) from the header block."""
    out: list[bytes] = []
    lines = data.splitlines(keepends=True)
    dropping = False
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            out.extend(lines[i:])
            break
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name
        if not dropping:
            out.append(line)
    return b"".join(out)


def wait_for_outcome(settings: Settings, queue_id: str, timeout: float) -> tuple[str, str]:
    """Follow a queued message: ("delivered"|"failed"|"waiting", what happened)."""
    spool = Spool(settings.spool_dir)
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = spool.find(queue_id)
        except (FileNotFoundError, DamagedEntry):  # moving between places: look again
            time.sleep(0.05)
            continue
        if found is None:
            return "delivered", f"delivered through {settings.system_account.server!r}"
        place, env = found
        if place == "dead":
            return "failed", env.dead_reason or "dead letter"
        if time.monotonic() >= deadline:
            return "waiting", f"not delivered yet: {env.last_reply or 'no attempt finished yet'}"
        time.sleep(0.1)
