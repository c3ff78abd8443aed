"""The command line: parses arguments and calls the functions that do the work.

Each command imports what it needs when it runs, so that `sysmail-sendmail` (which
cron and applications start for every message) loads neither the daemon nor the
HTTP and OAuth stacks. Nothing imports this module.

Exit codes: 0 success, 1 operational failure, 2 bad usage or invalid configuration.
`sendmail` (and `sysmail-sendmail`) exits with sysexits(3) codes, as sendmail does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from relay.errors import ConfigError, RelayError
from relay.listener import submit
from relay.settings import Settings, config_path, credential_errors, load_settings, warnings

OK, FAILED, USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> tuple[Settings, Path | None]:
    path = config_path(getattr(args, "config", None), os.environ)
    return load_settings(path), path


def _settings_to_read(args: argparse.Namespace) -> tuple[Settings, str | None]:
    from relay.admin import running
    """For `status` and `queue list|show`: the settings, or, when the file is invalid but
    a daemon runs on its state directory, enough to ask it and read the spool, after
    saying so on standard error."""
    path = config_path(getattr(args, "config", None), os.environ)
    try:
        return load_settings(path), None
    except ConfigError as e:
        found = running.despite_invalid(path, e)
        if found is None:
            raise
        settings, note = found
        print(f"sysmail-relay: warning: {note}", file=sys.stderr, flush=True)
        return settings, note


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import app
    settings, path = _settings(args)
    return app.run(settings, path)


def cmd_check(args: argparse.Namespace) -> int:
    from relay import app
    from relay.admin import status
    from relay.admin.server import Access
    settings, path = _settings(args)
    Access(settings.admin)  # what `serve` refuses, `check` refuses too (admin host, token)
    errors = credential_errors(settings)  # `serve` runs with them, holding the mail
    print(f"configuration {'valid, but mail is held' if errors else 'OK'} "
          f"({path or 'built-in default'})")
    print(status.render(status.collect(settings)).split("\nServers")[0])
    for warning in warnings(settings):
        print(f"warning: {warning}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if args.connect:
        ok = app.check_connect(settings, print)
        return OK if ok and not errors else FAILED
    return FAILED if errors else OK


def cmd_status(args: argparse.Namespace) -> int:
    from relay.admin import running, status
    settings, invalid = _settings_to_read(args)
    report = running.report(settings)
    if invalid:
        report["configuration_file_invalid"] = invalid
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return OK


def cmd_send_test(args: argparse.Namespace) -> int:
    settings, _ = _settings(args)
    reply = submit.send_test(settings, args.to)
    print(f"listener: {reply}")
    queue_id = submit.queue_id_of(reply)
    if queue_id is None or args.wait <= 0:
        return OK
    outcome, text = submit.wait_for_outcome(settings, queue_id, args.wait)
    print(f"{queue_id}: {outcome}: {text}")
    return OK if outcome == "delivered" else FAILED


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.admin import queue as queue_admin
    from relay.admin import queue_view, running
    from relay.spool import Spool
    settings = _settings_to_read(args)[0] if args.action in ("list", "show") \
        else _settings(args)[0]
    spool = Spool(settings.spool_dir)
    if args.action == "list":
        held = running.held_now(settings)
        rows = queue_admin.entries(spool, held)
        print(json.dumps(rows, indent=2) if args.json else queue_view.table(rows))
        return OK
    if args.action == "show":
        entry = queue_admin.show(spool, args.id)
        print(json.dumps(entry, indent=2, ensure_ascii=False) if args.json
              else queue_view.summary(entry))
        return OK
    if args.action == "retry" and not (args.all or args.id):
        print("queue retry: name a queue ID or --all", file=sys.stderr)
        return USAGE
    if args.action == "retry" and args.all:
        done = queue_admin.change(settings, "retry-all")
        print(f"{done.count} messages due now")
    elif args.action == "retry":
        done = queue_admin.change(settings, "retry", args.id)
        print(f"{args.id}: due now" + (" (back from the dead letters)" if done.place == "dead"
                                      else ""))
    else:
        done = queue_admin.change(settings, "delete", args.id)
        print(f"{args.id}: deleted")
    if not done.by_daemon:
        print("(the daemon is not running: the change applies when it starts)")
    return OK


def cmd_oauth(args: argparse.Namespace) -> int:
    from relay.admin import queue as queue_admin
    from relay.oauth import terminal as oauth_flow
    settings, _ = _settings(args)
    if args.action == "authorize":
        print(oauth_flow.authorize(settings, args.client, device=args.device,
                                   browser=not args.no_browser,
                                   emit=lambda text: print(text, flush=True)))
        if released := queue_admin.release_held(settings):  # it waited for the token
            print(released)
    elif args.action == "status":
        print(oauth_flow.status(settings, args.json))
    else:
        print(oauth_flow.revoke(settings, args.client))
    return OK


def cmd_sendmail(args: argparse.Namespace) -> int:
    return _sendmail(getattr(args, "config", None), args.sendmail_args)


def _sendmail(config: Path | None, argv: Sequence[str]) -> int:
    try:
        options = submit.parse_sendmail_args(list(argv))
    except ValueError as e:
        print(f"sendmail: {e}", file=sys.stderr)
        return submit.EX_USAGE
    try:
        target = submit.sendmail_target(config_path(config, os.environ))
    except ConfigError as e:
        print(f"sendmail: {e}", file=sys.stderr)
        return submit.EX_CONFIG
    if options.mode == "s":
        return submit.smtp_session(target)
    try:
        data = sys.stdin.buffer.read()
    except OSError as e:
        print(f"sendmail: cannot read the message from standard input: {e}", file=sys.stderr)
        return submit.EX_IOERR
    code, text = submit.sendmail(target, options, data)
    if text:
        print(f"sendmail: {text}", file=sys.stderr if code != submit.EX_OK else sys.stdout)
    return code


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                        help="TOML configuration (default: $RELAY_CONFIG, else "
                             "/etc/sysmail-relay/relay.toml if it exists, else built-in)")
    parser = argparse.ArgumentParser(
        prog="sysmail-relay", parents=[common],
        description="SMTP relay for the system mail account: applications hand mail to a local "
                    "listener; the relay makes the system address the sender, keeps each message "
                    "on disk and forwards it to the real server.",
        epilog="Exit codes: 0 success, 1 operational failure, 2 bad usage or configuration.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int],
                text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    command("serve", cmd_serve, "run the daemon (SIGTERM stops, SIGHUP reloads the "
                                "configuration, SIGUSR1 re-reads the queue)")
    p = command("check", cmd_check, "validate the configuration and show what it means")
    p.add_argument("--connect", action="store_true",
                   help="also open the upstream session step by step and print each step")
    p = command("status", cmd_status, "show the system e-mail account details and queue counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("send-test", cmd_send_test, "send a test notification through the running relay")
    p.add_argument("--to", required=True, metavar="ADDR", help="recipient of the test message")
    p.add_argument("--wait", type=float, default=30, metavar="SECONDS",
                   help="wait this long for the delivery result (0: do not wait; default 30)")
    p = command("queue", cmd_queue, "inspect and act on the spool, dead letters included")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser("list", parents=[common],
                        help="list waiting, held, sending, dead and quarantined messages")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = qsub.add_parser("show", parents=[common],
                        help="show one message: times, recipients with their state and the "
                             "server's replies")
    q.add_argument("id", metavar="ID")
    q.add_argument("--json", action="store_true", help="print the envelope as JSON")
    q = qsub.add_parser("retry", parents=[common],
                        help="make a message (or --all waiting messages) due now; a dead letter "
                             "comes back with its failed recipients")
    q.add_argument("id", nargs="?", metavar="ID")
    q.add_argument("--all", action="store_true", help="every waiting message")
    q = qsub.add_parser("delete", parents=[common], help="remove a message for good")
    q.add_argument("id", metavar="ID")
    p = command("oauth", cmd_oauth, "sign in with the OAuth provider, show or forget the "
                                    "stored authorization")
    osub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    o = osub.add_parser("authorize", parents=[common],
                        help="sign in (prints the address to open; a browser opens when there "
                             "is a display) and store the token; client_credentials: fetch one")
    o.add_argument("client", nargs="?", metavar="CLIENT",
                   help="the [oauth_clients.NAME] (default: the sending server's)")
    o.add_argument("--device", action="store_true",
                   help="device flow for hosts without a browser: enter a code on any device")
    o.add_argument("--no-browser", action="store_true", help="only print the address")
    o = osub.add_parser("status", parents=[common],
                        help="Granted / Not granted, account, scopes, expiry of each client")
    o.add_argument("--json", action="store_true", help="print JSON")
    o = osub.add_parser("revoke", parents=[common],
                        help="revoke at the provider where it can and forget the token")
    o.add_argument("client", nargs="?", metavar="CLIENT",
                   help="the [oauth_clients.NAME] (default: the sending server's)")
    p = command("sendmail", cmd_sendmail,
                "sendmail-compatible submission: message on stdin "
                "([-t] [-i|-oi] [-f ADDR] [-F NAME] [-bm|-bs] [--] [RCPT...]; sysexits "
                "codes; also installed as sysmail-sendmail)")
    p.add_argument("sendmail_args", nargs=argparse.REMAINDER, metavar="ARGS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sendmail":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "sendmail":  # sendmail's own options are not ours to parse
        args.sendmail_args = [*extra, *args.sendmail_args]
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"sysmail-relay: {e}", file=sys.stderr)
        return USAGE
    except RelayError as e:
        print(f"sysmail-relay: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return FAILED
    return code


def sendmail_main() -> int:
    return _sendmail(None, sys.argv[1:])
