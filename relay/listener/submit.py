"""Handing messages to the relay's own listener: `send-test` and `sendmail`.

Both speak SMTP to the listener, as any application does, so what they prove is
the live path. `sendmail` follows the sendmail(8) command line that programs rely
on (Postfix's reading of it where the two differ) and exits with sysexits(3) codes:

    -t              recipients from To:, Cc:, Bcc: (Resent-* when present), added to
                    those on the command line; Bcc: lines are removed
    -i, -oi         a line holding a single "." does not end the message
    -f ADDR, -r     envelope sender (default: login@hostname; "" or "<>": null sender)
    -F NAME         full name for the From: line added when the message has none
    -bm             deliver (the default);  -bs: SMTP on standard input and output
    -N, -R, -V      DSN: NOTIFY, RET, ENVID;  -B 8BITMIME|7BIT: the body type
    --              only recipients follow
    -o*, -O, -C, -L, -X, -h, -e, -d, -p, -A, -c, -G, -U, -m, -n, -s, -v, -x: accepted,
                    without effect on a relay client (-v prints the listener's reply)

Flags may be bundled (-ti), option values attached or separate (-fADDR, -f ADDR),
recipients may come before options and may be comma-separated lists.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formataddr, getaddresses, make_msgid

from relay.errors import DamagedEntry, SubmitError
from relay.listener.submit_target import Target as Target
from relay.listener.submit_target import listener_address as listener_address
from relay.listener.submit_target import sendmail_target as sendmail_target
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
    replies, refused = _transactions(host, port, sender, recipients, data)
    if refused:
        raise refused[0]
    return replies[-1]


def _transactions(host: str, port: int, sender: str, recipients: Sequence[str], data: bytes,
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


# --- sendmail(8) -----------------------------------------------------------------------------

@dataclass
class SendmailArgs:
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False    # -t
    ignore_dots: bool = False     # -i / -oi
    sender: str | None = None     # -f / -r ("" is the null sender)
    full_name: str | None = None  # -F
    mode: str = "m"               # -bm deliver | -bs SMTP on stdin/stdout
    notify: str | None = None     # -N
    ret: str | None = None        # -R
    envid: str | None = None      # -V
    body: str | None = None       # -B
    verbose: bool = False         # -v


_FLAGS = frozenset("tivcGIUmnsx")
_WITH_VALUE = frozenset("ABbCdeFfhLMNOopqQRrVX")
_MODES = {
    "p": "-bp lists the queue of sendmail; here: `sysmail-relay queue list`",
    "q": "-bq runs the queue of sendmail; the relay delivers by itself "
         "(`sysmail-relay queue retry --all` makes waiting mail due now)",
    "i": "-bi rebuilds sendmail's aliases; the relay has none",
    "d": "-bd runs sendmail as a daemon; here: `sysmail-relay serve`",
    "D": "-bD runs sendmail as a daemon; here: `sysmail-relay serve`",
    "v": "-bv verifies addresses; the relay cannot tell before it delivers",
    "t": "-bt is sendmail's address test mode",
    "a": "-ba is ARPANET mode, long gone",
    "h": "-bh prints sendmail's host status",
    "H": "-bH purges sendmail's host status",
}


def parse_sendmail_args(argv: Sequence[str]) -> SendmailArgs:
    """sendmail(8)'s options as programs pass them. Raises ValueError on what we cannot do."""
    args = SendmailArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            args.recipients.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            args.recipients.append(arg)
            continue
        j = 1
        while j < len(arg):
            opt = arg[j]
            j += 1
            if opt in _WITH_VALUE:
                value = arg[j:]
                if not value and opt != "q":  # -q[time]: its value is optional
                    if i >= len(argv):
                        raise ValueError(f"option -{opt} needs a value")
                    value = argv[i]
                    i += 1
                _set_option(args, opt, value)
                break
            if opt in _FLAGS:
                if opt == "t":
                    args.from_headers = True
                elif opt == "i":
                    args.ignore_dots = True
                elif opt == "v":
                    args.verbose = True
            else:
                raise ValueError(f"unknown option -{opt} (in {arg!r}); sysmail-sendmail takes "
                                 "-t -i -oi -f -F -bm -bs -N -R -V -B and recipients")
    for value in args.recipients:
        if value.strip() and not recipients_of([value]):
            raise ValueError(f"cannot read a recipient address in {value!r}")
    args.recipients = recipients_of(args.recipients)
    return args


def _set_option(args: SendmailArgs, opt: str, value: str) -> None:
    if opt in "fr":
        args.sender = _bare_address(value)
    elif opt == "F":
        args.full_name = value
    elif opt == "b":
        if value in ("m", "s"):
            args.mode = value
        else:
            raise ValueError(_MODES.get(value[:1], f"-b{value} is not a sendmail mode") +
                             ": sysmail-sendmail only submits mail (-bm) or speaks SMTP (-bs)")
    elif opt == "o" and value == "i":
        args.ignore_dots = True
    elif opt == "q":
        raise ValueError(_MODES["q"])
    elif opt == "N":
        words = [w.strip().upper() for w in value.split(",") if w.strip()]
        if not words or not (words == ["NEVER"] or
                             set(words) <= {"SUCCESS", "FAILURE", "DELAY"}):
            raise ValueError(f"-N {value}: give never, or some of success,failure,delay")
        args.notify = ",".join(words)
    elif opt == "R":
        if value.lower() not in ("full", "hdrs"):
            raise ValueError(f"-R {value}: give full or hdrs")
        args.ret = value.upper()
    elif opt == "V":
        if not value.isascii() or not value.isprintable() or " " in value or len(value) > 100:
            raise ValueError(f"-V {value!r}: an envelope id is up to 100 printable ASCII "
                             "characters")
        args.envid = value
    elif opt == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise ValueError(f"-B {value}: give 7BIT or 8BITMIME")
        args.body = value.upper()
    # -A -C -d -e -h -L -M -O -o<other> -p -Q -X: nothing for a relay client to do


def _bare_address(value: str) -> str:
    value = value.strip()
    if value in ("", "<>"):
        return ""
    found = [addr for _, addr in getaddresses([value]) if addr]
    return found[0] if found else value.strip("<>")


def recipients_of(values: Sequence[str]) -> list[str]:
    """Addresses from arguments or header values ("Name <a@b>", "a@b, c@d", groups), in
    order, each once. A bare local name ("root", as cron's MAILTO has it) gets this host's
    domain, as sendmail and Postfix qualify it."""
    found = [addr for _, addr in getaddresses(list(values)) if addr]
    return list(dict.fromkeys(a if "@" in a else f"{a}@{_domain()}" for a in found))


def _domain() -> str:
    name = socket.gethostname()
    return name if "." in name else (socket.getfqdn(name) or name or "localhost")


def read_message(stream: bytes, ignore_dots: bool) -> bytes:
    """Without -i a line holding a single '.' ends the message, as in sendmail(8).
    A leading mbox "From " line (not a header) is dropped, as sendmail does."""
    if stream.startswith(b"From "):  # never a header: no header name holds a space
        stream = stream.split(b"\n", 1)[1] if b"\n" in stream else b""
    if ignore_dots:
        return stream
    lines = stream.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip(b"\r\n") == b".":
            return b"".join(lines[:i])
    return stream


def default_sender() -> str:
    """login@hostname, the sender sendmail uses when no -f is given."""
    try:
        login = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        login = os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{os.getuid()}"
    return f"{login}@{socket.gethostname() or 'localhost'}"


def sendmail(target: Target | Settings, args: SendmailArgs, stdin: bytes) -> tuple[int, str]:
    """Submit one message the sendmail way: (sysexits code, what to print)."""
    if isinstance(target, Settings):
        target = Target(*listener_address(target), target.system_account.address or "")
    data = read_message(stdin, args.ignore_dots)
    recipients = list(args.recipients)
    if args.from_headers:
        headers = BytesHeaderParser().parsebytes(data)
        resent = any(headers.get(n) for n in ("Resent-To", "Resent-Cc", "Resent-Bcc"))
        names = ("Resent-To", "Resent-Cc", "Resent-Bcc") if resent else ("To", "Cc", "Bcc")
        recipients = recipients_of(
            [*recipients, *(str(v) for name in names for v in headers.get_all(name, []))])
        data = _drop_headers(data, {b"bcc", b"resent-bcc"})
    if not recipients:
        return EX_USAGE, ("no recipients: name them as arguments or use -t with To:, Cc: or "
                          "Bcc: lines")
    sender = default_sender() if args.sender is None else args.sender
    if args.full_name and not BytesHeaderParser().parsebytes(data).get("From"):
        shown = sender or target.address or "relay@localhost"
        data = f"From: {formataddr((args.full_name, shown))}\n".encode() + data
    mail_options: list[str] = []
    if args.body or any(b > 127 for b in data):
        mail_options.append(f"BODY={args.body or '8BITMIME'}")
    if not (sender + "".join(recipients)).isascii():
        mail_options.append("SMTPUTF8")
    if args.ret:
        mail_options.append(f"RET={args.ret}")
    if args.envid:
        mail_options.append(f"ENVID={args.envid}")
    rcpt_options = [f"NOTIFY={args.notify}"] if args.notify else []
    try:
        replies, refused = _transactions(target.host, target.port, sender, recipients, data,
                                         mail_options, rcpt_options)
    except Refused as e:
        return _exit_code(e), str(e)
    except SubmitError as e:
        return (EX_TEMPFAIL if e.temporary else EX_UNAVAILABLE), str(e)
    lines = [*replies] if args.verbose else []
    if refused:
        if replies:
            lines.append(f"queued for the other {len(recipients) - len(refused)} recipient(s)")
        return _exit_code(refused[0]), "\n".join([*(str(r) for r in refused), *lines])
    return EX_OK, "\n".join(lines)


def _exit_code(e: Refused) -> int:
    if e.code < 500:
        return EX_TEMPFAIL
    if e.stage == "connect" or (e.code == 554 and e.stage == "mail"):
        return EX_NOPERM      # not allowed to use this relay (listener.allowed_networks)
    if e.stage == "rcpt":
        return EX_NOUSER
    if e.stage in ("mail", "data"):
        return EX_DATAERR     # a malformed sender, a message too large
    return EX_UNAVAILABLE


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


def _drop_headers(data: bytes, names: set[bytes]) -> bytes:
    """Remove every occurrence of the headers (and their folded lines) from the header block."""
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
        dropping = line.split(b":", 1)[0].strip().lower() in names
        if not dropping:
            out.append(line)
    return b"".join(out)


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
