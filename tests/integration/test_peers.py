"""Self-tests of the real-server peers (tests/peers): each proven from real clients.

smtplib, poplib and swaks talk to the private Postfix/Dovecot/Cyrus started by
the session fixture ``mail_peers``; messages are read back from its Maildir and
mechanisms from its logs.
"""

from __future__ import annotations

import poplib
import re
import shutil
import smtplib
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.peers.fixtures import MailPeers, SmtpSink
from tests.peers.postfix import MESSAGE_SIZE_LIMIT
from tests.peers.postfix_listeners import LISTENER_NAMES
from tests.peers.sasl_client import MECHANISMS, smtp_auth

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
TIMEOUT = 10.0
SENDER = "app@sender.test"
AUTH_LISTENERS = ("dovecot_auth", "cyrus_auth", "starttls_auth", "tls_auth")


# --- helpers -----------------------------------------------------------------


def new_message_id() -> str:
    return f"<{uuid.uuid4().hex}@peers.test>"


def message_bytes(message_id: str, subject: str = "peer self-test") -> bytes:
    return (
        f"From: {SENDER}\r\nTo: someone@rcpt.test\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n\r\nHello from the peer self-tests.\r\n"
    ).encode()


def tls_context(cafile: Path, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = check_hostname
    return ctx


@contextmanager
def smtp(
    peers: MailPeers,
    listener: str,
    *,
    starttls: ssl.SSLContext | None = None,
    implicit_tls: ssl.SSLContext | None = None,
) -> Iterator[smtplib.SMTP]:
    port = peers.port(listener)
    client: smtplib.SMTP
    if implicit_tls is not None:
        client = smtplib.SMTP_SSL(HOST, port, timeout=TIMEOUT, context=implicit_tls)
    else:
        client = smtplib.SMTP(HOST, port, timeout=TIMEOUT)
    try:
        client.ehlo("client.test")
        if starttls is not None:
            client.starttls(context=starttls)
            client.ehlo("client.test")
        yield client
    finally:
        client.close()


def send(client: smtplib.SMTP, recipients: list[str], message_id: str) -> None:
    refused = client.sendmail(SENDER, recipients, message_bytes(message_id))
    assert refused == {}


def delivered(peers: MailPeers, message_id: str, count: int = 1) -> list[EmailMessage]:
    copies = peers.find_messages(message_id, timeout=TIMEOUT)
    assert len(copies) == count, f"{message_id}: {len(copies)} copies delivered, want {count}"
    return copies


def wait_for_log(read: Callable[[], str], since: int, pattern: str) -> str:
    """New log text (after offset *since*) once it matches *pattern*."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        new = read()[since:]
        if re.search(pattern, new):
            return new
        if time.monotonic() > deadline:
            raise AssertionError(f"log never matched {pattern!r}; new lines:\n{new}")
        time.sleep(0.02)


def pop3_login(peers: MailPeers, user: str, password: str) -> None:
    pop = poplib.POP3(HOST, peers.pop3_port, timeout=TIMEOUT)
    try:
        pop.user(user)
        pop.pass_(password)
    finally:
        pop.quit()


def auth_for(peers: MailPeers, listener: str) -> tuple[str, str]:
    if listener == "cyrus_auth":
        return peers.cyrus_user.username, peers.cyrus_user.password
    return peers.notify.username, peers.notify.password


# --- the fixture itself ----------------------------------------------------------


def test_peers_listen_on_loopback_only(mail_peers: MailPeers) -> None:
    ports = [*mail_peers.ports.values(), mail_peers.pop3_port, mail_peers.pop3s_port]
    assert set(mail_peers.ports) == set(LISTENER_NAMES)
    assert len(set(ports)) == len(ports)
    assert mail_peers.host == HOST
    assert mail_peers.ca_file.is_file()
    assert mail_peers.untrusted_ca_file.is_file()
    listening: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A":  # LISTEN
                listening.setdefault(int(port_hex, 16), set()).add(address)
    for port in ports:
        assert listening.get(port) == {"0100007F"}, f"{port} listens on {listening.get(port)}"


# --- delivery through every listener ---------------------------------------------


def test_plain_listener_delivers_one_file_per_recipient(clean_peers: MailPeers) -> None:
    message_id = new_message_id()
    with smtp(clean_peers, "plain") as client:
        assert not client.has_extn("auth")
        assert not client.has_extn("starttls")
        assert client.esmtp_features["size"] == str(MESSAGE_SIZE_LIMIT)
        send(client, ["one@rcpt.test", "two@other.test"], message_id)
    copies = delivered(clean_peers, message_id, count=2)
    assert {m["Delivered-To"] for m in copies} == {"one@rcpt.test", "two@other.test"}
    assert all(m["Return-Path"] == f"<{SENDER}>" for m in copies)
    assert len(clean_peers.wait_for_messages(2)) == 2
    assert clean_peers.sasl_method_of(message_id, timeout=0.5) is None
    clean_peers.clear_maildir()
    assert clean_peers.maildir_messages() == []


@pytest.mark.parametrize("listener", LISTENER_NAMES)
def test_every_listener_delivers(mail_peers: MailPeers, listener: str) -> None:
    good = tls_context(mail_peers.ca_file)
    kwargs: dict[str, ssl.SSLContext] = {}
    if listener in ("dovecot_auth", "cyrus_auth", "starttls_auth", "pop_before_smtp"):
        kwargs["starttls"] = good
    elif listener == "tls_auth":
        kwargs["implicit_tls"] = good
    elif listener == "starttls_untrusted":
        kwargs["starttls"] = tls_context(mail_peers.untrusted_ca_file)  # trust it on purpose
    elif listener == "starttls_wrongname":
        kwargs["starttls"] = tls_context(mail_peers.ca_file, check_hostname=False)
    if listener == "pop_before_smtp":
        pop3_login(mail_peers, mail_peers.notify.username, mail_peers.notify.password)
    message_id = new_message_id()
    with smtp(mail_peers, listener, **kwargs) as client:
        if listener in AUTH_LISTENERS:
            user, password = auth_for(mail_peers, listener)
            assert smtp_auth(client, "PLAIN", user, password)[0] == 235
        send(client, [f"to-{listener}@rcpt.test"], message_id)
    (copy,) = delivered(mail_peers, message_id)
    assert copy["Delivered-To"] == f"to-{listener}@rcpt.test"
    received = str(copy["Received"])
    if kwargs:
        assert "using TLSv1." in received  # smtpd_tls_received_header
    if listener in AUTH_LISTENERS:
        assert f"Authenticated sender: {auth_for(mail_peers, listener)[0]}" in received
        assert mail_peers.sasl_method_of(message_id) == "PLAIN"


def test_message_size_limit_is_enforced(mail_peers: MailPeers) -> None:
    with smtp(mail_peers, "plain") as client:
        code, text = client.mail(SENDER, [f"SIZE={MESSAGE_SIZE_LIMIT + 1}"])
    assert code == 552, text


# --- TLS -------------------------------------------------------------------------


def test_tls_certificates_are_verified(mail_peers: MailPeers) -> None:
    good = tls_context(mail_peers.ca_file)
    with smtp(mail_peers, "starttls_auth", starttls=good) as client:
        assert client.has_extn("auth")
    with (
        pytest.raises(ssl.SSLCertVerificationError, match="local issuer"),
        smtp(mail_peers, "starttls_untrusted", starttls=good),
    ):
        pass
    with (
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
        smtp(mail_peers, "starttls_wrongname", starttls=good),
    ):
        pass
    rogue = tls_context(mail_peers.untrusted_ca_file)
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        smtp(mail_peers, "tls_auth", implicit_tls=rogue),
    ):
        pass


def test_starttls_required_listener_refuses_auth_before_starttls(mail_peers: MailPeers) -> None:
    with smtp(mail_peers, "starttls_auth") as client:
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, text = smtp_auth(
            client, "PLAIN", mail_peers.notify.username, mail_peers.notify.password
        )
        assert code == 530 and b"Must issue a STARTTLS command first" in text, text
        code, text = client.mail(SENDER)
        assert code == 530 and b"STARTTLS" in text, text


@pytest.mark.parametrize("listener", AUTH_LISTENERS)
def test_auth_listeners_refuse_unauthenticated_rcpt(mail_peers: MailPeers, listener: str) -> None:
    good = tls_context(mail_peers.ca_file)
    tls = {"implicit_tls": good} if listener == "tls_auth" else {"starttls": good}
    with smtp(mail_peers, listener, **tls) as client:
        assert client.has_extn("auth")
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("someone@rcpt.test")
    assert code == 554 and b"Access denied" in text, text


# --- SASL mechanisms -------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("who", ["notify", "unicode_user"])
def test_dovecot_sasl_mechanisms(mail_peers: MailPeers, mechanism: str, who: str) -> None:
    account = getattr(mail_peers, who)
    message_id = new_message_id()
    with smtp(mail_peers, "dovecot_auth") as client:
        assert mechanism in client.esmtp_features["auth"].split()
        code, text = smtp_auth(client, mechanism, account.username, account.password)
        assert code == 235, text
        send(client, ["sasl@rcpt.test"], message_id)
    (copy,) = delivered(mail_peers, message_id)
    # Postfix writes each non-ASCII byte of the SASL user name as "?" in Received:.
    shown = account.username.encode().decode("ascii", "replace").replace("\ufffd", "?")
    assert f"Authenticated sender: {shown}" in str(copy["Received"])
    login = mail_peers.sasl_login_of(message_id)
    assert login is not None
    assert (login.method, login.username) == (mechanism, account.username)
    assert mail_peers.sasl_method_of(login.queue_id) == mechanism


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_cyrus_sasl_mechanisms(mail_peers: MailPeers, mechanism: str) -> None:
    account = mail_peers.cyrus_user
    message_id = new_message_id()
    with smtp(mail_peers, "cyrus_auth") as client:
        assert client.esmtp_features["auth"].split() == list(MECHANISMS)
        code, text = smtp_auth(client, mechanism, account.username, account.password)
        assert code == 235, text
        send(client, ["sasl@rcpt.test"], message_id)
    delivered(mail_peers, message_id)
    assert mail_peers.sasl_method_of(message_id) == mechanism


def test_cyrus_digest_md5_takes_realm_separately(mail_peers: MailPeers) -> None:
    with smtp(mail_peers, "cyrus_auth") as client:
        code, text = smtp_auth(
            client,
            "DIGEST-MD5",
            "cyrususer",
            mail_peers.cyrus_user.password,
            realm=mail_peers.cyrus_realm,
        )
    assert code == 235, text


@pytest.mark.parametrize("listener", ["dovecot_auth", "cyrus_auth"])
def test_wrong_password_is_refused(mail_peers: MailPeers, listener: str) -> None:
    user, _ = auth_for(mail_peers, listener)
    with smtp(mail_peers, listener) as client:
        code, text = smtp_auth(client, "PLAIN", user, "not-the-password")
    assert code == 535, text


SWAKS_CASES = [
    ("dovecot_auth", "CRAM-MD5", ()),
    ("dovecot_auth", "DIGEST-MD5", ()),
    ("cyrus_auth", "CRAM-MD5", ()),
    ("cyrus_auth", "DIGEST-MD5", ()),
    ("starttls_auth", "DIGEST-MD5", ("--tls", "--tls-verify")),
    ("tls_auth", "CRAM-MD5", ("--tls-on-connect", "--tls-verify")),
]


@pytest.mark.parametrize(("listener", "mechanism", "tls_args"), SWAKS_CASES)
def test_swaks_authenticates_and_delivers(
    mail_peers: MailPeers, listener: str, mechanism: str, tls_args: tuple[str, ...]
) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed: run .ci/install-peers.sh as root")
    user, password = auth_for(mail_peers, listener)
    message_id = new_message_id()
    ca = ("--tls-ca-path", str(mail_peers.ca_file)) if tls_args else ()
    result = subprocess.run(
        [
            swaks,
            "--server",
            HOST,
            "--port",
            str(mail_peers.port(listener)),
            "--from",
            SENDER,
            "--to",
            "swaks@rcpt.test",
            "--header",
            f"Message-Id: {message_id}",
            "--auth",
            mechanism,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--timeout",
            "10",
            *tls_args,
            *ca,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    delivered(mail_peers, message_id)
    assert mail_peers.sasl_method_of(message_id) == mechanism


# --- failure injection -----------------------------------------------------------


@pytest.mark.parametrize("listener", ["plain", "dovecot_auth"])
def test_rcpt_failure_injection(mail_peers: MailPeers, listener: str) -> None:
    message_id = new_message_id()
    with smtp(mail_peers, listener) as client:
        if listener == "dovecot_auth":
            assert smtp_auth(client, "PLAIN", *auth_for(mail_peers, listener))[0] == 235
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("tempfail-x@rcpt.test")
        assert (code, text[:5]) == (450, b"4.2.1"), text
        code, text = client.rcpt("reject-x@rcpt.test")
        assert (code, text[:5]) == (550, b"5.1.1"), text
        assert client.rcpt("fine@rcpt.test")[0] == 250
        assert client.data(message_bytes(message_id))[0] == 250
    (copy,) = delivered(mail_peers, message_id)
    assert copy["Delivered-To"] == "fine@rcpt.test"


@pytest.mark.parametrize(
    ("local_part", "code", "status"),
    [
        ("data451-x", 451, b"4.3.0"),
        ("data554-x", 554, b"5.7.1"),
    ],
)
def test_failure_after_final_dot_single_recipient(
    mail_peers: MailPeers, local_part: str, code: int, status: bytes
) -> None:
    message_id = new_message_id()
    with smtp(mail_peers, "plain") as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(f"{local_part}@rcpt.test")[0] == 250
        # smtplib.data() raises unless DATA got 354: this reply comes after the dot.
        reply = client.data(message_bytes(message_id))
    assert (reply[0], reply[1][:5]) == (code, status), reply
    assert mail_peers.find_messages(message_id, timeout=0.5) == []


def test_failure_after_final_dot_by_sender_any_recipients(mail_peers: MailPeers) -> None:
    message_id = new_message_id()
    with smtp(mail_peers, "plain") as client:
        assert client.mail("data451-sender@sender.test")[0] == 250
        assert client.rcpt("a@rcpt.test")[0] == 250
        assert client.rcpt("b@rcpt.test")[0] == 250
        code, _ = client.data(message_bytes(message_id))
    assert code == 451
    assert mail_peers.find_messages(message_id, timeout=0.5) == []


def test_recipient_rule_after_dot_needs_exactly_one_recipient(mail_peers: MailPeers) -> None:
    """Documents Postfix: at end-of-data the recipient is known only if there is one."""
    message_id = new_message_id()
    with smtp(mail_peers, "plain") as client:
        send(client, ["ok@rcpt.test", "data451-x@rcpt.test"], message_id)
    delivered(mail_peers, message_id, count=2)


# --- POP3 ------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["notify", "unicode_user"])
def test_pop3_user_pass(mail_peers: MailPeers, who: str) -> None:
    account = getattr(mail_peers, who)
    since = len(mail_peers.dovecot_log_text())
    pop3_login(mail_peers, account.username, account.password)
    new = wait_for_log(mail_peers.dovecot_log_text, since, rf"Login: user=<{account.username}>")
    assert "method=PLAIN" in new


def test_pop3_apop(mail_peers: MailPeers) -> None:
    since = len(mail_peers.dovecot_log_text())
    pop = poplib.POP3(HOST, mail_peers.pop3_port, timeout=TIMEOUT)
    try:
        assert re.search(rb"<[^>]+@[^>]+>", pop.getwelcome())  # APOP timestamp
        pop.apop(mail_peers.notify.username, mail_peers.notify.password)
        assert pop.stat()[0] >= 0
    finally:
        pop.quit()
    wait_for_log(mail_peers.dovecot_log_text, since, r"Login: user=<notify>, method=APOP")


def test_pop3_stls_and_pop3s(mail_peers: MailPeers) -> None:
    ctx = tls_context(mail_peers.ca_file)
    since = len(mail_peers.dovecot_log_text())
    pop = poplib.POP3(HOST, mail_peers.pop3_port, timeout=TIMEOUT)
    try:
        assert "STLS" in pop.capa()
        pop.stls(ctx)
        pop.user(mail_peers.notify.username)
        pop.pass_(mail_peers.notify.password)
    finally:
        pop.quit()
    pops = poplib.POP3_SSL(HOST, mail_peers.pop3s_port, timeout=TIMEOUT, context=ctx)
    try:
        pops.user(mail_peers.unicode_user.username)
        pops.pass_(mail_peers.unicode_user.password)
    finally:
        pops.quit()
    new = wait_for_log(mail_peers.dovecot_log_text, since, r"Login: user=<ünicode>.*TLS")
    assert re.search(r"Login: user=<notify>, method=PLAIN, .*, TLS, ", new)


def test_pop3_wrong_password_is_refused(mail_peers: MailPeers) -> None:
    with pytest.raises(poplib.error_proto, match="ERR"):
        pop3_login(mail_peers, mail_peers.notify.username, "wrong")


# --- POP before SMTP -------------------------------------------------------------


def _pbs_rcpt(peers: MailPeers) -> tuple[int, bytes]:
    with smtp(peers, "pop_before_smtp") as client:
        assert client.mail(SENDER)[0] == 250
        return client.rcpt("pbs@rcpt.test")


def test_pop_before_smtp(mail_peers: MailPeers) -> None:
    mail_peers.clear_pop_before_smtp()
    code, text = _pbs_rcpt(mail_peers)
    assert code == 554 and b"POP before SMTP" in text, text

    with pytest.raises(poplib.error_proto):
        pop3_login(mail_peers, mail_peers.notify.username, "wrong")
    assert mail_peers.last_pop_login() is None
    assert _pbs_rcpt(mail_peers)[0] == 554

    before = time.time()
    pop3_login(mail_peers, mail_peers.notify.username, mail_peers.notify.password)
    last = mail_peers.last_pop_login()
    assert last is not None and last >= int(before)
    message_id = new_message_id()
    with smtp(mail_peers, "pop_before_smtp") as client:
        send(client, ["pbs@rcpt.test"], message_id)
    delivered(mail_peers, message_id)

    mail_peers.age_pop_login(mail_peers.pop_before_smtp_window + 60)
    assert _pbs_rcpt(mail_peers)[0] == 554


# --- smtp-sink -------------------------------------------------------------------


def test_smtp_sink_accepts(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        assert client.sendmail(SENDER, ["sink@rcpt.test"], message_bytes(new_message_id())) == {}
