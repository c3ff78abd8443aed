"""Start and stop the whole set of peers; :class:`MailPeers` is what tests get."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from tests.oauth_server import DOVECOT_CLIENT_ID, DOVECOT_CLIENT_SECRET, AuthServer
from tests.peers import certs, cyrus, dovecot, pop_before_smtp, postfix, users
from tests.peers.certs import PeerPKI
from tests.peers.maildir import Maildir
from tests.peers.netutil import HOST, free_ports
from tests.peers.postfix_listeners import LISTENER_NAMES, OAUTH_LISTENER, oauth_listener
from tests.peers.postfix_log import PostfixLog, SaslLogin
from tests.peers.procutil import grant_traverse, make_dir, restore_modes, which
from tests.peers.users import Account

REQUIRED_BINARIES = ("postfix", "postconf", "dovecot", "saslpasswd2")
POP_BEFORE_SMTP_WINDOW = 300  # seconds a POP3 login opens the pop_before_smtp listener


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if which(b) is None]


@dataclass
class MailPeers:
    """The running peers. Every port is on :attr:`host` (127.0.0.1)."""

    host: str
    ports: dict[str, int]  # Postfix listener name -> port; names in LISTENER_NAMES
    pop3_port: int  # plain POP3, STLS offered, APOP timestamp in the greeting
    pop3s_port: int  # POP3 over implicit TLS
    pki: PeerPKI
    notify: Account  # Dovecot user, ASCII
    unicode_user: Account  # Dovecot user, UTF-8 name and password
    cyrus_user: Account  # Cyrus sasldb user "cyrususer@example.test"
    cyrus_realm: str
    state_dir: Path
    pop_before_smtp_window: int
    oauth_port: int  # STARTTLS, then AUTH XOAUTH2/OAUTHBEARER checked against oauth_server
    oauth_server: AuthServer  # the OAuth 2.0 authorization server Dovecot asks
    _maildir: Maildir
    _postfix_log: PostfixLog
    _dovecot_log: Path
    _pbs: pop_before_smtp.PopBeforeSmtp
    started_in: float = 0.0  # seconds taken to start everything

    # --- TLS ---------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        """The CA that signed the good server certificate: give this to clients."""
        return self.pki.ca_file

    @property
    def untrusted_ca_file(self) -> Path:
        return self.pki.untrusted_ca_file

    @property
    def users(self) -> dict[str, str]:
        """Every login name -> password (Dovecot users and the Cyrus user@realm)."""
        return {a.username: a.password for a in (self.notify, self.unicode_user, self.cyrus_user)}

    def port(self, listener: str) -> int:
        return self.ports[listener]

    # --- delivered mail ------------------------------------------------------
    @property
    def maildir(self) -> Path:
        return self._maildir.path

    def maildir_messages(self) -> list[Path]:
        """Delivered files, oldest first: one per accepted recipient."""
        return self._maildir.messages()

    def parsed_messages(self) -> list[EmailMessage]:
        return self._maildir.parsed()

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[Path]:
        """Wait until at least *n* files are delivered (TimeoutError otherwise)."""
        return self._maildir.wait_for(n, timeout)

    def find_messages(self, message_id: str, timeout: float = 10.0) -> list[EmailMessage]:
        """Delivered copies of one Message-ID, waiting up to *timeout* for the first."""
        return self._maildir.find(message_id, timeout)

    def clear_maildir(self) -> None:
        self._maildir.clear()

    # --- logs ----------------------------------------------------------------
    def log_text(self) -> str:
        """The private Postfix's log (smtpd lines carry ``postfix/<listener>/smtpd``)."""
        return self._postfix_log.text()

    def dovecot_log_text(self) -> str:
        """Dovecot's log: ``pop3-login: Login: user=<...>, method=APOP, ..., TLS, ...``."""
        try:
            return self._dovecot_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def queue_ids_of(self, message_id: str) -> list[str]:
        return self._postfix_log.queue_ids(message_id)

    def sasl_login_of(self, message_id_or_queue_id: str) -> SaslLogin | None:
        return self._postfix_log.sasl_login(message_id_or_queue_id)

    def sasl_method_of(self, message_id_or_queue_id: str, timeout: float = 5.0) -> str | None:
        """``sasl_method=`` Postfix logged for that message (None: sent without AUTH).

        Waits up to *timeout* for the log lines to appear.
        """
        deadline = time.monotonic() + timeout
        while True:
            login = self._postfix_log.sasl_login(message_id_or_queue_id)
            if login is not None or time.monotonic() > deadline:
                return login.method if login else None
            time.sleep(0.02)

    # --- POP before SMTP -----------------------------------------------------
    def clear_pop_before_smtp(self) -> None:
        """Forget all POP3 logins: pop_before_smtp refuses RCPT until the next one."""
        self._pbs.clear()

    def last_pop_login(self, ip: str = HOST) -> float | None:
        """Unix time of the last successful POP3 login from *ip* (post-login record)."""
        return self._pbs.last_login(ip)

    def age_pop_login(self, seconds: float, ip: str = HOST) -> None:
        """Make the recorded POP3 login *seconds* old (beyond the window: refused)."""
        self._pbs.age_login(seconds, ip)


@dataclass
class _Running:
    postfix: postfix.Postfix | None = None
    dovecot: dovecot.Dovecot | None = None
    oauth_server: AuthServer | None = None
    modes: list[tuple[Path, int]] = field(default_factory=list)


def start(directory: Path) -> tuple[MailPeers, _Running]:
    """Configure and start Dovecot and Postfix under *directory*; see :func:`stop`."""
    require_root()
    began = time.monotonic()
    running = _Running()
    make_dir(directory, 0o755)
    running.modes = grant_traverse(directory)
    try:
        pki = certs.make_pki(directory / "pki")
        pbs = pop_before_smtp.setup(
            directory / "pop-before-smtp", POP_BEFORE_SMTP_WINDOW, writer_user=dovecot.INTERNAL_USER
        )
        running.oauth_server = authority = AuthServer().start()
        ports = free_ports(len(LISTENER_NAMES) + 3)
        pop3_port, pop3s_port, oauth_port = ports[:3]
        smtp_ports = dict(zip(LISTENER_NAMES, ports[3:], strict=True))
        dv = dovecot.configure(
            directory / "dovecot",
            pki.server,
            users.DOVECOT_USERS,
            pbs.postlogin_script,
            pop3_port,
            pop3s_port,
            introspection=(f"{authority.url}/introspect", DOVECOT_CLIENT_ID,
                           DOVECOT_CLIENT_SECRET),
        )
        cy = cyrus.configure(postfix.cyrus_config_dir(directory / "postfix"), users.CYRUS)
        pf = postfix.configure(
            directory / "postfix",
            pki,
            {**smtp_ports, OAUTH_LISTENER: oauth_port},
            dv.auth_socket,
            cy.config_dir,
            pbs.policy_script,
            extra=(oauth_listener(pki, dovecot.OAUTH_SERVICE),),
        )
        running.dovecot = dv  # registered first: stop() copes with a half-started server
        dv.start()
        running.postfix = pf
        pf.start()
    except BaseException:
        stop(running)
        raise
    peers = MailPeers(
        host=HOST,
        ports={name: port for name, port in pf.ports.items() if name != OAUTH_LISTENER},
        pop3_port=pop3_port,
        pop3s_port=pop3s_port,
        pki=pki,
        notify=users.NOTIFY,
        unicode_user=users.UNICODE,
        cyrus_user=users.CYRUS,
        cyrus_realm=cy.realm,
        state_dir=directory,
        pop_before_smtp_window=POP_BEFORE_SMTP_WINDOW,
        oauth_port=oauth_port,
        oauth_server=authority,
        _maildir=Maildir(pf.maildir),
        _postfix_log=PostfixLog(pf.log_file),
        _dovecot_log=dv.log_file,
        _pbs=pbs,
        started_in=time.monotonic() - began,
    )
    return peers, running


def require_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            "the mail peers must run as root: they start Postfix and Dovecot, which "
            "drop privileges to postfix, dovecot and nobody"
        )


def new_state_dir() -> Path:
    """A fresh directory for the peers' state, outside pytest's own tree.

    pytest keeps /tmp/pytest-of-<user> at mode 0700 and resets it whenever any
    pytest session starts; Postfix, Dovecot and nobody could then no longer
    reach the state in the middle of a run. So the state lives in its own
    temporary directory and :func:`archive` moves it under pytest's afterwards.
    """
    return Path(tempfile.mkdtemp(prefix="sysmail-relay-peers-"))


def archive(state: Path, into: Path) -> Path:
    """Move the stopped peers' *state* (logs, Maildir, configs) to *into*/state."""
    target = into / "state"
    try:
        os.rename(state, target)
    except OSError:  # another filesystem: keep the logs, drop the rest
        target.mkdir(parents=True, exist_ok=True)
        for log in state.rglob("*.log"):
            shutil.copy2(log, target / f"{log.parent.name}-{log.name}")
        shutil.rmtree(state, ignore_errors=True)
    return target


def stop(running: _Running) -> None:
    """Stop what :func:`start` started (Postfix first, then its SASL server Dovecot, then
    the authorization server Dovecot asks)."""
    errors: list[BaseException] = []
    for server in (running.postfix, running.dovecot):
        if server is None:
            continue
        try:
            server.stop()
        except BaseException as exc:  # keep stopping the others
            errors.append(exc)
    running.postfix = running.dovecot = None
    if running.oauth_server is not None:
        running.oauth_server.close()
        running.oauth_server = None
    restore_modes(running.modes)
    running.modes = []
    if errors:
        raise errors[0]
