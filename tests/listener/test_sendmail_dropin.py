"""`sysmail-sendmail` as /usr/sbin/sendmail: real programs that call sendmail, against
the running daemon, and the command line as programs write it.

The programs are Debian's bsd-mailx (`mail`, its sendmail set in a mailrc) and PHP's
mail() (php-cli with sendmail_path); .ci/install-container.sh installs both. Each
calls a symlink named `sendmail` to the installed `sysmail-sendmail`, as the
operations guide installs it, and finds the daemon through $RELAY_CONFIG.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest

from relay.listener import submit
from relay.listener.submit import parse_sendmail_args
from tests.support import Daemon, free_port, relay_command

SYSMAIL_SENDMAIL = Path(sys.executable).parent / "sysmail-sendmail"


def write_config(tmp_path: Path, port: int, listener: str = "") -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[listener]
port = {port}
{listener}
[system_account]
address = "notify@example.com"
[admin]
port = 0
""")
    return config


def start_daemon(tmp_path: Path, listener: str = "") -> Daemon:
    port = free_port()
    daemon = Daemon(write_config(tmp_path, port, listener), tmp_path / "relay.log", port)
    daemon.start()
    return daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop(signal.SIGKILL)


@pytest.fixture
def sendmail(tmp_path: Path) -> Path:
    """`sendmail` -> sysmail-sendmail, as `ln -s` installs it in /usr/sbin."""
    assert SYSMAIL_SENDMAIL.exists(), "sysmail-sendmail is not installed: pip install -e ."
    link = tmp_path / "bin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(SYSMAIL_SENDMAIL)
    return link


def env_for(daemon: Daemon, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return {**env, "RELAY_CONFIG": str(daemon.config), "HOME": str(tmp_path), **extra}


def outbox(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "state" / "outbox" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def delivered_to(data: bytes) -> set[str]:
    return {line.split(b":", 1)[1].strip().decode()
            for line in data.splitlines() if line.startswith(b"Delivered-To:")}


def the_message(tmp_path: Path, count: int = 1) -> tuple[Message, bytes]:
    wait_for(lambda: len(outbox(tmp_path)) == count)
    data = outbox(tmp_path)[-1]
    return message_from_bytes(data), data


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: .ci/install-container.sh installs it (as root)")
    return path


# --- real programs ---------------------------------------------------------------------------

def test_bsd_mailx_sends_through_sysmail_sendmail(daemon: Daemon, sendmail: Path,
                                                  tmp_path: Path) -> None:
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={sendmail}\nset sendwait\n")  # sendwait: report failures
    result = subprocess.run(
        [program("bsd-mailx"), "-s", "Nightly backup: done ✓", "-c", "ops@example.com",
         "-b", "audit@example.com", "-r", "Backup <backup@host.example.com>",
         "-a", "X-Job: backup", "boss@example.com"],
        input="All 3 volumes saved.\n.\nThe line above is a lone dot.\n", text=True,
        env=env_for(daemon, tmp_path, MAILRC=str(mailrc)), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    msg, data = the_message(tmp_path)
    assert delivered_to(data) == {"boss@example.com", "ops@example.com", "audit@example.com"}
    assert msg["Return-Path"] == "<notify@example.com>"
    assert "notify@example.com" in msg["From"] and msg["X-Job"] == "backup"
    assert msg["Bcc"] is None and b"\nBcc:" not in data
    assert "backup@host.example.com" in msg["Reply-To"]
    body = msg.get_payload(decode=True)
    assert b"\n.\nThe line above is a lone dot." in body.replace(b"\r\n", b"\n")
    assert "from=<backup@host.example.com>" in daemon.log_text()


def test_bsd_mailx_reports_a_stopped_relay(daemon: Daemon, sendmail: Path,
                                           tmp_path: Path) -> None:
    daemon.stop()
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={sendmail}\nset sendwait\n")
    result = subprocess.run([program("bsd-mailx"), "-s", "x", "boss@example.com"],
                            input="lost?\n", text=True, capture_output=True, timeout=60,
                            env=env_for(daemon, tmp_path, MAILRC=str(mailrc)))
    assert result.returncode != 0
    assert "error code 75" in result.stderr and "is `sysmail-relay serve` running?" in \
        result.stderr
    assert (tmp_path / "dead.letter").exists()  # mail keeps what it could not hand over


PHP_MAIL = r"""
$ok = mail("boss@example.com, Desk <desk@example.com>", "Approval request #42",
           "Please approve.\n.\nStill the body.\n",
           "From: Workflow <workflow@apps.example.com>\r\nCc: ops@example.com\r\n"
           . "Bcc: audit@example.com\r\nContent-Type: text/plain; charset=UTF-8",
           "-fbounces@apps.example.com");
exit($ok ? 0 : 3);
"""


def test_php_mail_sends_through_sysmail_sendmail(daemon: Daemon, sendmail: Path,
                                                 tmp_path: Path) -> None:
    result = subprocess.run(
        [program("php"), "-n", "-d", f"sendmail_path={sendmail} -t -i", "-r", PHP_MAIL],
        env=env_for(daemon, tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    msg, data = the_message(tmp_path)
    assert delivered_to(data) == {"boss@example.com", "desk@example.com", "ops@example.com",
                                  "audit@example.com"}
    assert msg["Subject"] == "Approval request #42" and msg["Bcc"] is None
    assert "workflow@apps.example.com" in msg["Reply-To"]
    assert b"Please approve.\r\n.\r\nStill the body." in data
    assert "from=<bounces@apps.example.com>" in daemon.log_text()


def test_php_mail_returns_false_when_the_relay_is_down(daemon: Daemon, sendmail: Path,
                                                      tmp_path: Path) -> None:
    daemon.stop()
    result = subprocess.run(
        [program("php"), "-n", "-d", f"sendmail_path={sendmail} -t -i", "-r", PHP_MAIL],
        env=env_for(daemon, tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr


# --- the command line as programs write it -----------------------------------------------------

def run_sendmail(daemon: Daemon, tmp_path: Path, *args: str, stdin: bytes = b"",
                 config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = env_for(daemon, tmp_path, RELAY_CONFIG=str(config or daemon.config))
    return subprocess.run([str(SYSMAIL_SENDMAIL), *args], input=stdin, env=env,
                          capture_output=True, timeout=60)


def test_cron_style_invocation_with_8bit_body_and_full_name(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    # Debian cron: sendmail -i -FCronDaemon -B8BITMIME -oem <MAILTO>
    body = "To: ops@example.com\nSubject: Cron <root@host> backup\n\nÜberweisung ok\n"
    result = run_sendmail(daemon, tmp_path, "-i", "-FCronDaemon", "-B8BITMIME", "-oem",
                          "ops@example.com", stdin=body.encode())
    assert result.returncode == 0, result.stderr
    msg, data = the_message(tmp_path)
    assert "Überweisung ok".encode() in data
    assert msg["From"].startswith("CronDaemon") and "notify@example.com" in msg["From"]


def test_bundled_flags_resent_headers_and_a_leading_mbox_line(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    message = (b"From someone@example.com Mon Jan  1 00:00:00 2024\n"
               b"To: original@example.com\nResent-To: forwarded@example.com\n"
               b"Resent-Bcc: hidden@example.com\nSubject: fwd\n\nbody\n")
    result = run_sendmail(daemon, tmp_path, "-ti", "-f", "<app@example.com>", stdin=message)
    assert result.returncode == 0, result.stderr
    msg, data = the_message(tmp_path)
    assert delivered_to(data) == {"forwarded@example.com", "hidden@example.com"}
    assert not data.startswith(b"From ") and b"\nFrom someone" not in data
    assert msg["Resent-Bcc"] is None


def test_dsn_options_reach_the_listener(daemon: Daemon, tmp_path: Path) -> None:
    result = run_sendmail(daemon, tmp_path, "-N", "failure,delay", "-R", "hdrs", "-V", "job-7",
                          "-v", "--", "ops@example.com", stdin=b"Subject: dsn\n\nx\n")
    assert result.returncode == 0, result.stderr
    assert b"queued as" in result.stdout  # -v prints the listener's reply
    the_message(tmp_path)
    queue_id = result.stdout.decode().split()[-1]
    assert f"{queue_id}: queued" in daemon.log_text()


def test_too_many_recipients_go_in_several_transactions(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "max_recipients = 2")
    try:
        rcpts = [f"user{i}@example.com" for i in range(5)]
        result = run_sendmail(daemon, tmp_path, *rcpts, stdin=b"Subject: many\n\nx\n")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(outbox(tmp_path)) == 3)
        assert set().union(*(delivered_to(d) for d in outbox(tmp_path))) == set(rcpts)
    finally:
        daemon.stop()


def test_sysexits_codes(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, 'allowed_networks = ["192.0.2.0/24"]\n'
                                    "max_message_size = 1024")
    try:
        assert run_sendmail(daemon, tmp_path, "-q").returncode == submit.EX_USAGE
        bp = run_sendmail(daemon, tmp_path, "-bp")
        assert bp.returncode == submit.EX_USAGE and b"queue list" in bp.stderr
        assert run_sendmail(daemon, tmp_path, "-f").returncode == submit.EX_USAGE
        refused = run_sendmail(daemon, tmp_path, "a@example.com", stdin=b"x\n")
        assert refused.returncode == submit.EX_NOPERM, refused.stderr  # 554 not allowed
    finally:
        daemon.stop()
    daemon = start_daemon(tmp_path, "max_message_size = 1024")
    try:
        big = run_sendmail(daemon, tmp_path, "a@example.com", stdin=b"x" * 4000 + b"\n")
        assert big.returncode == submit.EX_DATAERR, big.stderr  # 552 too large
        bad = run_sendmail(daemon, tmp_path, "a@example.com", "x@[192.0.2.1]",
                           stdin=b"Subject: partly\n\nx\n")
        assert bad.returncode == submit.EX_NOUSER, bad.stderr
        assert b"queued for the other 1 recipient" in bad.stderr
        wait_for(lambda: len(outbox(tmp_path)) == 1)
        bad_cfg = tmp_path / "broken.toml"
        bad_cfg.write_text("[listener\n")
        assert run_sendmail(daemon, tmp_path, "a@example.com", stdin=b"x\n",
                            config=bad_cfg).returncode == submit.EX_CONFIG
    finally:
        daemon.stop()
    assert run_sendmail(daemon, tmp_path, "a@example.com",
                        stdin=b"x\n").returncode == submit.EX_TEMPFAIL


def test_a_config_with_secrets_it_cannot_read_still_names_the_listener(
        daemon: Daemon, tmp_path: Path) -> None:
    """A program runs sendmail as its own user, without the relay's credentials."""
    config = tmp_path / "with-credentials.toml"
    config.write_text(daemon.config.read_text().replace(
        'address = "notify@example.com"', 'address = "notify@example.com"\nserver = "system"')
        + '[servers.system]\nhost = "smtp.example.com"\n'
          '[servers.system.auth]\nmethod = "PLAIN"\nusername = "notify"\n'
          'password_file = "smtp_password"\n')  # in $CREDENTIALS_DIRECTORY, not ours
    result = run_sendmail(daemon, tmp_path, "ops@example.com", stdin=b"Subject: s\n\nx\n",
                          config=config)
    assert result.returncode == 0, result.stderr
    the_message(tmp_path)


def test_bs_speaks_smtp_on_stdin_and_stdout(daemon: Daemon, tmp_path: Path) -> None:
    dialogue = (b"EHLO app.example.com\r\nMAIL FROM:<app@example.com>\r\n"
                b"RCPT TO:<ops@example.com>\r\nDATA\r\nSubject: bs\r\n\r\nvia -bs\r\n.\r\n"
                b"QUIT\r\n")
    result = run_sendmail(daemon, tmp_path, "-bs", stdin=dialogue)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode()
    assert replies.startswith("220 ") and "250 2.0.0 OK queued as" in replies
    assert replies.rstrip().splitlines()[-1].startswith("221")
    msg, _ = the_message(tmp_path)
    assert msg["Subject"] == "bs"


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    (["-t", "-i"], {"from_headers": True, "ignore_dots": True}),
    (["-ti"], {"from_headers": True, "ignore_dots": True}),
    (["-oi", "-t"], {"from_headers": True, "ignore_dots": True}),
    (["-f", "a@example.com"], {"sender": "a@example.com"}),
    (["-fa@example.com"], {"sender": "a@example.com"}),
    (["-r", "<a@example.com>"], {"sender": "a@example.com"}),
    (["-f", ""], {"sender": ""}),
    (["-f<>"], {"sender": ""}),
    (["-F", "Cron Daemon", "x@example.com"], {"full_name": "Cron Daemon",
                                              "recipients": ["x@example.com"]}),
    (["-bm", "--", "a@example.com", "-b@example.com"],
     {"mode": "m", "recipients": ["a@example.com", "-b@example.com"]}),
    (["-bs"], {"mode": "s"}),
    (["a@example.com, B <b@example.com>", "-i", "a@example.com"],
     {"recipients": ["a@example.com", "b@example.com"], "ignore_dots": True}),
    (["-odi", "-oem", "-O", "DeliveryMode=b", "-C", "/etc/mail/sendmail.cf", "-v",
      "-L", "tag", "-Ac", "-U", "-G", "x@example.com"],
     {"recipients": ["x@example.com"], "verbose": True}),
    (["-N", "success,FAILURE", "-R", "full", "-V", "env-1", "-B", "8bitmime"],
     {"notify": "SUCCESS,FAILURE", "ret": "FULL", "envid": "env-1", "body": "8BITMIME"}),
])
def test_parse_sendmail_args(argv: list[str], expected: dict[str, object]) -> None:
    parsed = parse_sendmail_args(argv)
    for key, value in expected.items():
        assert getattr(parsed, key) == value, key


def test_a_bare_local_name_is_qualified_with_this_host() -> None:
    (rcpt,) = parse_sendmail_args(["root"]).recipients
    assert rcpt.startswith("root@") and len(rcpt) > len("root@")


@pytest.mark.parametrize("argv", [["-X"], ["-Z"], ["-bp"], ["-bi"], ["-q"], ["-q30m"],
                                  ["-N", "sometimes"], ["-R", "all"], ["-B", "binary"],
                                  ["-f"], ["not an address@"]])
def test_what_sendmail_cannot_do_is_a_usage_error(argv: list[str]) -> None:
    if argv == ["-X"]:  # -X takes a log file: only the missing value is the mistake
        with pytest.raises(ValueError, match="needs a value"):
            parse_sendmail_args(argv)
        return
    with pytest.raises(ValueError):
        parse_sendmail_args(argv)


# --- send-test waiting for the outcome ---------------------------------------------------------

def held_daemon(tmp_path: Path) -> Daemon:
    """A daemon whose account is inactive: what it accepts stays in queue/."""
    port = free_port()
    config = write_config(tmp_path, port)
    config.write_text(config.read_text().replace('address = "notify@example.com"',
                                                 'address = "notify@example.com"\nactive = false'))
    daemon = Daemon(config, tmp_path / "relay.log", port)
    daemon.start()
    return daemon


def start_send_test(daemon: Daemon, wait: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [relay_command(), "send-test", "--config", str(daemon.config), "--to", "ops@example.com",
         "--wait", wait], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def queued_entry(tmp_path: Path) -> Path:
    queue = tmp_path / "state" / "spool" / "queue"
    wait_for(lambda: len(os.listdir(queue)) == 1)
    return queue / os.listdir(queue)[0]


def finish(cli: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, err = cli.communicate(timeout=60)  # a guard against a hang, not a measurement
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    return cli.returncode, out + err


def test_send_test_reports_a_message_moved_to_quarantine_as_failed(tmp_path: Path) -> None:
    daemon = held_daemon(tmp_path)
    try:
        cli = start_send_test(daemon, wait="60")
        entry = queued_entry(tmp_path)
        cli.send_signal(signal.SIGSTOP)  # the daemon quarantines it while the command looks away
        try:
            os.truncate(entry, 30)  # the spool's file, cut short in its header
            daemon.config.write_text(daemon.config.read_text().replace("active = false",
                                                                       "active = true"))
            daemon.send_signal(signal.SIGHUP)
            reason = tmp_path / "state" / "spool" / "quarantine" / entry.name / "REASON"
            wait_for(reason.is_file)
        finally:
            cli.send_signal(signal.SIGCONT)
        code, output = finish(cli)
        assert code == 1, output
        assert (f"{entry.name}: failed: damaged in the spool, moved to quarantine and not sent: "
                in output), output
        assert "cut short in its header" in output
    finally:
        daemon.stop(signal.SIGKILL)


def test_send_test_on_an_entry_damaged_while_it_waits_fails_at_once_with_the_reason(
        tmp_path: Path) -> None:
    """It used to look again and again, past --wait, for as long as the entry stayed."""
    daemon = held_daemon(tmp_path)
    try:
        cli = start_send_test(daemon, wait="5")
        entry = queued_entry(tmp_path)
        truncated = b'{"id": "trunc'  # an envelope cut short, in a header that is whole
        entry.write_bytes(b"RELAYQ1 %07X\n%s\n" % (16 + len(truncated) + 1, truncated))
        code, output = finish(cli)
        assert code == 1, output
        assert f"{entry.name}: failed: damaged in the spool" in output, output
        assert "the envelope in its header cannot be read" in output
    finally:
        daemon.stop(signal.SIGKILL)


def test_send_test_as_a_user_without_the_daemons_spool_does_not_claim_delivery(
        tmp_path: Path, daemon: Daemon) -> None:
    """Another state_dir (another user's $XDG_STATE_HOME): the message cannot be followed,
    which is not the same as delivered."""
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(daemon.config.read_text().replace(
        f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{tmp_path / "other"}"'))
    result = subprocess.run(
        [relay_command(), "send-test", "--config", str(elsewhere), "--to", "ops@example.com"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"there is no spool at {tmp_path / 'other' / 'spool'}" in result.stdout
