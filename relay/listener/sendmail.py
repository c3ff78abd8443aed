"""The sendmail(8) drop-in: a program's message handed to the relay's listener.

It speaks SMTP to the listener (relay.listener.client), as any application does.
`sendmail` follows the sendmail(8) command line that programs rely
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

import os
import pwd
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import formataddr, getaddresses

from relay.errors import SubmitError
from relay.listener.client import (
    EX_DATAERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Refused,
    transactions,
)
from relay.listener.submit_target import Target, listener_address
from relay.settings import Settings


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
        replies, refused = transactions(target.host, target.port, sender, recipients, data,
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
