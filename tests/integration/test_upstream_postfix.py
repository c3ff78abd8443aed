"""The relay as an operator runs it, sending through real Postfix with Dovecot and Cyrus SASL.

Each test writes a TOML file, starts `sysmail-relay serve`, hands it a message with
smtplib, and reads the result where Postfix delivered it (a Maildir), in Postfix's
log (which SASL mechanism was used) or in the relay's spool (deferred, dead).
"""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.peers.peers import MailPeers
from tests.support import free_port, relay_command

from .operator import SYSTEM, RecordingProxy, Relay, assert_relayed, auth_block, message, start

pytestmark = pytest.mark.integration

def test_plain_server_without_auth(clean_peers: MailPeers, tmp_path: Path,
                                   relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}')
    relay.send(message("plain-1"))
    assert_relayed(clean_peers, "plain-1")


@pytest.mark.parametrize("method", ["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5"])
def test_each_sasl_mechanism_through_dovecot(clean_peers: MailPeers, tmp_path: Path,
                                             relays: list[Relay], method: str) -> None:
    user = clean_peers.notify
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\n'
                  f'port = {clean_peers.port("dovecot_auth")}\nencryption = "none"\n'
                  + auth_block(method, user.username, user.password))
    tag = f"dovecot-{method.lower()}"
    relay.send(message(tag))
    assert_relayed(clean_peers, tag)
    assert clean_peers.sasl_method_of(f"<{tag}@apps.example.com>") == method


@pytest.mark.parametrize("method", ["PLAIN", "CRAM-MD5", "DIGEST-MD5"])
def test_each_sasl_mechanism_through_cyrus(clean_peers: MailPeers, tmp_path: Path,
                                           relays: list[Relay], method: str) -> None:
    user = clean_peers.cyrus_user
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\n'
                  f'port = {clean_peers.port("cyrus_auth")}\nencryption = "none"\n'
                  + auth_block(method, user.username, user.password))
    tag = f"cyrus-{method.lower()}"
    relay.send(message(tag))
    assert_relayed(clean_peers, tag)
    assert clean_peers.sasl_method_of(f"<{tag}@apps.example.com>") == method


def test_utf8_username_and_password_with_digest_md5(clean_peers: MailPeers, tmp_path: Path,
                                                    relays: list[Relay]) -> None:
    user = clean_peers.unicode_user
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\n'
                  f'port = {clean_peers.port("dovecot_auth")}\nencryption = "none"\n'
                  + auth_block("DIGEST-MD5", user.username, user.password))
    relay.send(message("unicode-digest"))
    assert_relayed(clean_peers, "unicode-digest")


def test_starttls_then_auth_with_the_company_ca(clean_peers: MailPeers, tmp_path: Path,
                                                relays: list[Relay]) -> None:
    user = clean_peers.notify
    relay = start(relays, tmp_path, f'host = "localhost"\n'
                  f'port = {clean_peers.port("starttls_auth")}\nencryption = "starttls"\n'
                  f'ca_file = "{clean_peers.ca_file}"\n'
                  + auth_block("PLAIN", user.username, user.password))
    relay.send(message("starttls"))
    assert_relayed(clean_peers, "starttls")
    (delivered,) = clean_peers.find_messages("<starttls@apps.example.com>")
    received = " ".join(delivered.get_all("Received", []))
    assert "TLSv1.3" in received or "TLSv1.2" in received


def test_implicit_tls_then_auth(clean_peers: MailPeers, tmp_path: Path,
                                relays: list[Relay]) -> None:
    user = clean_peers.notify
    relay = start(relays, tmp_path, f'host = "localhost"\nport = {clean_peers.port("tls_auth")}\n'
                  f'encryption = "tls"\nca_file = "{clean_peers.ca_file}"\n'
                  + auth_block("LOGIN", user.username, user.password))
    relay.send(message("implicit-tls"))
    assert_relayed(clean_peers, "implicit-tls")
    assert clean_peers.sasl_method_of("<implicit-tls@apps.example.com>") == "LOGIN"


def test_wrong_password_is_deferred_and_never_shown(clean_peers: MailPeers, tmp_path: Path,
                                                    relays: list[Relay]) -> None:
    secret = "Wr0ng-Passw0rd-Marker"
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\n'
                  f'port = {clean_peers.port("dovecot_auth")}\nencryption = "none"\n'
                  + auth_block("PLAIN", clean_peers.notify.username, secret))
    queue_id = relay.send(message("wrong-password"))
    env = relay.wait_envelope(queue_id, "queue", "535")
    assert "refused the login" in env["last_reply"]
    status = relay.cli("status")
    shown = relay.cli("queue", "show", queue_id)
    for text in (relay.daemon.log_text(), status.stdout, shown.stdout, env["last_reply"]):
        assert secret not in text
    assert "refused the login" in relay.daemon.log_text()


def test_starttls_required_but_not_offered_is_deferred_never_sent_in_clear(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}\n'
                  'encryption = "starttls"')
    queue_id = relay.send(message("no-starttls"))
    env = relay.wait_envelope(queue_id, "queue", "does not offer STARTTLS")
    assert env["attempts"] >= 1
    assert clean_peers.maildir_messages() == []


@pytest.mark.parametrize(("listener", "ca", "expected"), [
    ("starttls_untrusted", "ca_file", "not trusted"),
    ("starttls_wrongname", "ca_file", "not trusted"),
])
def test_bad_certificates_are_refused(clean_peers: MailPeers, tmp_path: Path,
                                      relays: list[Relay], listener: str, ca: str,
                                      expected: str) -> None:
    relay = start(relays, tmp_path, f'host = "localhost"\nport = {clean_peers.port(listener)}\n'
                  f'encryption = "starttls"\nca_file = "{clean_peers.ca_file}"')
    queue_id = relay.send(message(listener))
    relay.wait_envelope(queue_id, "queue", expected)
    assert clean_peers.maildir_messages() == []


def test_tls_verify_false_sends_to_a_wrong_name_and_warns(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "localhost"\n'
                  f'port = {clean_peers.port("starttls_wrongname")}\n'
                  'encryption = "starttls"\ntls_verify = false')
    relay.send(message("no-verify"))
    assert_relayed(clean_peers, "no-verify")
    assert "tls_verify = false" in relay.daemon.log_text()
    assert "NOT verified" in relay.cli("status").stdout


def test_5xx_recipient_is_dead_lettered_and_the_others_delivered(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}')
    queue_id = relay.send(message("mixed"), rcpts=("boss@example.com", "reject-x@example.com"))
    env = relay.wait_envelope(queue_id, "dead", "550 5.1.1")
    states = {r["address"]: r["state"] for r in env["recipients"]}
    assert states == {"boss@example.com": "delivered", "reject-x@example.com": "failed"}
    assert_relayed(clean_peers, "mixed")


def test_pipelining_postfix_gets_one_command_at_a_time_and_each_reply_counts(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    """Postfix offers PIPELINING; aiosmtplib does not use it: MAIL, each RCPT and DATA
    go one at a time, each after the reply to the one before, and each reply counts."""
    proxy = RecordingProxy(clean_peers.port("plain"))  # Postfix offers PIPELINING here
    try:
        relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {proxy.port}')
        mixed = relay.send(message("pipe-mixed"),
                           rcpts=("boss@example.com", "reject-a@example.com"))
        env = relay.wait_envelope(mixed, "dead", "550 5.1.1")
        assert {r["address"]: r["state"] for r in env["recipients"]} == {
            "boss@example.com": "delivered", "reject-a@example.com": "failed"}
        assert_relayed(clean_peers, "pipe-mixed")
        # no valid recipient: no DATA, the transaction is reset and nothing is sent
        refused = relay.send(message("pipe-none"),
                             rcpts=("reject-b@example.com", "reject-c@example.com"))
        env = relay.wait_envelope(refused, "dead", "550 5.1.1")
        assert {r["state"] for r in env["recipients"]} == {"failed"}
        relay.send(message("pipe-after"))
        assert_relayed(clean_peers, "pipe-after")
        assert clean_peers.find_messages("<pipe-none@apps.example.com>") == []
        commands = [r for r in proxy.reads if r[:4] in (b"MAIL", b"RCPT", b"DATA", b"RSET")]
        assert [c.split(b":")[0].strip() for c in commands] == [
            b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA",
            b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"RSET",
            b"MAIL FROM", b"RCPT TO", b"DATA"], proxy.reads
        assert proxy.connections == 1  # and the connection went on
    finally:
        proxy.close()


def test_messages_over_one_connection_go_in_turn_and_postfix_takes_each_once(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    """Eight messages at once over one connection: each MAIL goes out only after
    Postfix's reply to the final dot before it, and every message arrives once."""
    proxy = RecordingProxy(clean_peers.port("plain"))
    try:
        relay = start(relays, tmp_path,
                      f'host = "127.0.0.1"\nport = {proxy.port}\npool_size = 1')
        tags = [f"chain-{n}" for n in range(8)]
        with ThreadPoolExecutor(len(tags)) as clients:
            list(clients.map(lambda tag: relay.send(message(tag)), tags))
        for tag in tags:
            assert_relayed(clean_peers, tag)  # exactly one copy each
        assert proxy.connections == 1
        sent, answered, mails, chained = b"", b"", 0, 0
        for from_relay, data in list(proxy.log):
            if not from_relay:
                answered += data
                continue
            sent += data
            if sent.count(b"MAIL FROM:") > mails:
                mails = sent.count(b"MAIL FROM:")
                chained += sent.count(b"\r\n.\r\n") > answered.count(b" queued as ")
        assert mails == len(tags) and chained == 0, proxy.log
    finally:
        proxy.close()


def test_server_without_pipelining_gets_one_command_at_a_time(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    proxy = RecordingProxy(clean_peers.port("plain_no_pipelining"))
    try:
        relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {proxy.port}')
        mixed = relay.send(message("nopipe"), rcpts=("boss@example.com", "reject-a@example.com"))
        env = relay.wait_envelope(mixed, "dead", "550 5.1.1")
        assert {r["address"]: r["state"] for r in env["recipients"]} == {
            "boss@example.com": "delivered", "reject-a@example.com": "failed"}
        assert_relayed(clean_peers, "nopipe")
        commands = [r for r in proxy.reads if r[:4] in (b"MAIL", b"RCPT", b"DATA")]
        assert [c.split(b":")[0] for c in commands] == [
            b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA\r\n"], proxy.reads
    finally:
        proxy.close()


def test_4xx_recipient_is_retried(clean_peers: MailPeers, tmp_path: Path,
                                  relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}')
    queue_id = relay.send(message("tempfail"), rcpts=("tempfail-x@example.com",))
    env = relay.wait_envelope(queue_id, "queue", "450 4.2.1")
    deadline = time.monotonic() + 20
    while env["attempts"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        found = relay.envelope(queue_id)
        env = found[1] if found else env
    assert env["attempts"] >= 2


@pytest.mark.parametrize(("sender", "place", "reply"), [
    ("data451-notify@example.com", "queue", "451"),
    ("data554-notify@example.com", "dead", "554"),
])
def test_refusal_after_data(clean_peers: MailPeers, tmp_path: Path, relays: list[Relay],
                            sender: str, place: str, reply: str) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}',
                  address=sender)
    queue_id = relay.send(message(f"after-data-{reply}"))
    env = relay.wait_envelope(queue_id, place, reply)
    assert "DATA" in (env.get("last_reply") or "")
    assert clean_peers.maildir_messages() == []


def test_message_larger_than_the_servers_size_fails_at_once(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}')
    body = ("x" * 998 + "\r\n") * 11_000  # about 11 MB; Postfix here takes 10 MB
    queue_id = relay.send(message("too-big", body))
    env = relay.wait_envelope(queue_id, "dead", "SIZE")
    assert env["attempts"] == 1  # the first attempt (EHLO told the size) made it a dead letter


def test_large_message_is_sent_from_its_file_unchanged(
        clean_peers: MailPeers, tmp_path: Path, relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {clean_peers.port("plain")}')
    body = ".a line that starts with a dot\r\n" + ("z" * 76 + "\r\n") * 40_000 + "..two\r\n"
    relay.send(message("large", body))  # 3 MB: more than the relay keeps in memory
    (delivered,) = clean_peers.find_messages("<large@apps.example.com>")
    assert delivered.get_payload() == body.replace("\r\n", "\n")


def test_server_down_then_up_nothing_lost(clean_peers: MailPeers, tmp_path: Path,
                                          relays: list[Relay]) -> None:
    relay = start(relays, tmp_path, f'host = "127.0.0.1"\nport = {free_port()}')
    queue_id = relay.send(message("down-up"))
    relay.wait_envelope(queue_id, "queue", "refused")
    relay.config.write_text(relay.config.read_text().replace(
        "[servers.up]\n", "[servers.up]\n").rsplit("port = ", 1)[0]
        + f"port = {clean_peers.port('plain')}\n")
    relay.daemon.send_signal(signal.SIGHUP)
    assert_relayed(clean_peers, "down-up")


def test_check_connect_prints_each_step_and_no_password(clean_peers: MailPeers,
                                                         tmp_path: Path) -> None:
    user = clean_peers.notify
    config = tmp_path / "relay.toml"
    server = (f'host = "localhost"\nport = {clean_peers.port("starttls_auth")}\n'
              f'encryption = "starttls"\nca_file = "{clean_peers.ca_file}"\n')
    config.write_text(f'state_dir = "{tmp_path}"\n[system_account]\naddress = "{SYSTEM}"\n'
                      f'server = "up"\n[servers.up]\n{server}'
                      + auth_block("CRAM-MD5", user.username, user.password))
    result = subprocess.run([relay_command(), "check", "--connect", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[0] for line in result.stdout.splitlines() if " ms " in line]
    assert steps == ["connect", "EHLO", "STARTTLS", "certificate", "EHLO", "AUTH", "QUIT"]
    assert "235" in result.stdout and user.password not in result.stdout
    bad = config.read_text().replace(user.password, "not-the-password")
    config.write_text(bad)
    failed = subprocess.run([relay_command(), "check", "--connect", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout and "not-the-password" not in failed.stdout
