"""The upstream of scenarios T, X and TS: a private Postfix that wants STARTTLS and a login.

Built from the test peers (tests/peers/): their PKI, their Dovecot (passwd-file
users for AUTH PLAIN; with an OAuth authorization server, bearer tokens checked by
introspection for the SASL service ``oauth``) and two of their Postfix listeners:
``starttls_auth`` (STARTTLS required, AUTH through Dovecot only after it, RCPT
needs AUTH) and, with OAuth, ``oauth`` (the same, XOAUTH2/OAUTHBEARER only).
Unlike the test peers it keeps nothing: every recipient is remote
(`mydestination` empty) and `default_transport = discard`, so the queue holds a
message only from cleanup to the discard(8) agent. `in_flow_delay = 0` and no
anvil limits, so the upstream does not slow its clients down on purpose.

It counts from its log (`maillog_file`, `smtpd_tls_loglevel = 1`): messages
delivered (discard's ``status=sent``), SMTP sessions, TLS handshakes and the
resumed ones, and from each session's ``disconnect from ...`` statistics the
STARTTLS and AUTH commands (``auth=1``, ``auth=0/1`` for a refused one).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bench.procstat import read_stat, tree_cpu_seconds
from tests.oauth_server import DOVECOT_CLIENT_ID, DOVECOT_CLIENT_SECRET, AuthServer
from tests.peers import certs, dovecot, users
from tests.peers.netutil import HOST, free_ports
from tests.peers.postfix import FAIL_AT_RCPT, MASTER_CF_BASE, Postfix
from tests.peers.postfix_listeners import (
    OAUTH_LISTENER,
    Listener,
    listeners,
    master_cf_lines,
    oauth_listener,
)
from tests.peers.procutil import grant_traverse, make_dir, read_pid, restore_modes, write_file

SUBMISSION = "starttls_auth"
"""The test peers' listener the relay and the null client send to."""
ACCOUNT = users.NOTIFY
"""The Dovecot user both systems log in as (AUTH PLAIN)."""

MAIN_CF = """# The upstream of bench/run.py scenarios T, X and TS (written by bench/upstream.py)
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = upstream.localhost
mydomain = localhost
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = {host}
inet_protocols = ipv4
maillog_file = {dir}/postfix.log
maillog_file_prefixes = {dir}
alias_maps =
alias_database =
biff = no
notify_classes =
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_event_limit_exceptions = 0.0.0.0/0

# Accept, queue (cleanup fsyncs as always), then throw away: no mailbox, no relaying.
in_flow_delay = 0
default_transport = discard:bench upstream
relay_transport = $default_transport

# What the test peers' listeners refer to.
peer_fail_injection = check_recipient_access regexp:{dir}/fail-at-rcpt.regexp
peer_dovecot_auth_path = {dovecot_auth}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_sasl_security_options = noanonymous
smtpd_sasl_type = dovecot
smtpd_sasl_mechanism_filter = !xoauth2, !oauthbearer, static:all
smtpd_sasl_path = $peer_dovecot_auth_path
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database = btree:{dir}/data/smtpd_scache
"""

_TLS = re.compile(rb"smtpd\[\d+\]: \w+ TLS connection established from [^:]+: (.*)$", re.M)
_DISCONNECT = re.compile(rb"smtpd\[\d+\]: disconnect from \S+ (.*)$", re.M)
_STAT = re.compile(rb"(\w+)=(\d+)(?:/(\d+))?")
_CONNECT = re.compile(rb"smtpd\[\d+\]: connect from ", re.M)
_DELIVERED = b"status=sent"
_QUEUE_WAIT = re.compile(rb"delays=[\d.]+/([\d.]+)/[\d.]+/[\d.]+, dsn=[\d.]+, status=sent")
"""discard's `delays=a/b/c/d`: b is the time a message waited in the queue manager"""


@dataclass(frozen=True)
class HopCounts:
    """What the upstream saw, from its log."""

    sessions: int
    """SMTP connections (smtpd's "connect from")"""
    disconnected: int
    tls_handshakes: int
    tls_resumed: int
    """of them resumed TLS 1.3 sessions (see `resumed`)"""
    starttls: int
    auth: int
    """AUTH commands that succeeded"""
    auth_refused: int
    delivered: int
    queue_wait_mean_ms: float
    queue_wait_max_ms: float
    """the time messages waited in the upstream's queue manager (discard's "delays=a/b/c/d",
    b, 10 ms resolution): above a few ms, the upstream's queue held the run back"""

    def figures(self, messages: int) -> dict[str, float]:
        """Per 1,000 messages (AUTH exchanges: refused ones too), and the queue wait."""
        scale = 1000 / max(messages, 1)
        return {"sessions_per_1000": self.sessions * scale,
                "tls_handshakes_per_1000": self.tls_handshakes * scale,
                "tls_resumed_per_1000": self.tls_resumed * scale,
                "auth_per_1000": (self.auth + self.auth_refused) * scale,
                "upstream_queue_wait_ms": self.queue_wait_mean_ms}


def resumed(details: bytes) -> bool:
    """A resumed TLS 1.3 session. Postfix 3.7 at `smtpd_tls_loglevel = 1` logs
    "server-digest SHA256" after the signature algorithm only when the server signed the
    handshake with its certificate's key, which a resumption skips (checked with
    `openssl s_client -sess_in`: "Reused" and no server-digest). A resumed TLS 1.2
    session logs the same line as a new one: not counted (both systems speak TLS 1.3).
    Level 2 would log "Reusing old session (RFC 5077 session ticket)", and counts the same,
    but also every handshake state."""
    return details.startswith(b"TLSv1.3 ") and b"server-digest" not in details


def count(log: bytes) -> HopCounts:
    tls = _TLS.findall(log)
    waits = [float(b) * 1000 for b in _QUEUE_WAIT.findall(log)]
    auth = refused = starttls = 0
    for stats in _DISCONNECT.findall(log):
        for name, good, tried in _STAT.findall(stats):
            ok, total = int(good), int(tried or good)
            if name == b"auth":
                auth, refused = auth + ok, refused + total - ok
            elif name == b"starttls":
                starttls += total
    return HopCounts(sessions=len(_CONNECT.findall(log)),
                     disconnected=len(_DISCONNECT.findall(log)),
                     tls_handshakes=len(tls), tls_resumed=sum(1 for d in tls if resumed(d)),
                     starttls=starttls, auth=auth, auth_refused=refused,
                     delivered=log.count(_DELIVERED),
                     queue_wait_mean_ms=sum(waits) / len(waits) if waits else 0.0,
                     queue_wait_max_ms=max(waits, default=0.0))


class TlsUpstream:
    """Start with `with TlsUpstream(directory) as upstream:`; everything stops on leaving."""

    name = "the upstream Postfix"

    def __init__(self, directory: Path, authority: AuthServer | None = None) -> None:
        self.directory = directory
        self.authority = authority
        self._modes: list[tuple[Path, int]] = []
        self._dovecot: dovecot.Dovecot | None = None
        self._postfix: Postfix | None = None
        self._offset = 0
        self._delivered = 0

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> TlsUpstream:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        make_dir(self.directory, 0o755)
        self._modes = grant_traverse(self.directory)
        self.pki = certs.make_pki(self.directory / "pki")
        pop3, pop3s, submission, oauth = free_ports(4)
        postlogin = write_file(self.directory / "postlogin.sh", "#!/bin/sh\nexec \"$@\"\n",
                               mode=0o755)
        introspection = None if self.authority is None else (
            f"{self.authority.url}/introspect", DOVECOT_CLIENT_ID, DOVECOT_CLIENT_SECRET)
        self._dovecot = dovecot.configure(self.directory / "dovecot", self.pki.server,
                                          users.DOVECOT_USERS, postlogin, pop3, pop3s,
                                          introspection=introspection)
        self._dovecot.start()
        defined = [next(lsn for lsn in listeners(self.pki) if lsn.name == SUBMISSION)]
        ports = {SUBMISSION: submission}
        if self.authority is not None:
            defined.append(oauth_listener(self.pki, dovecot.OAUTH_SERVICE))
            ports[OAUTH_LISTENER] = oauth
        self._postfix = configure_postfix(self.directory / "postfix", self.pki,
                                          self._dovecot.auth_socket, defined, ports)
        self._postfix.start()

    def stop(self) -> None:
        """Postfix, then Dovecot; the first error is raised once both were tried."""
        errors: list[BaseException] = []
        for server in (self._postfix, self._dovecot):
            if server is not None:
                try:
                    server.stop()
                except BaseException as e:  # keep stopping the other
                    errors.append(e)
        self._postfix = self._dovecot = None
        restore_modes(self._modes)
        self._modes = []
        if errors:
            raise errors[0]

    # --- what the measurement needs -------------------------------------------------------

    @property
    def port(self) -> int:
        return self._running().ports[SUBMISSION]

    @property
    def oauth_port(self) -> int:
        return self._running().ports[OAUTH_LISTENER]

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    @property
    def log_file(self) -> Path:
        return self.directory / "postfix" / "postfix.log"

    def _running(self) -> Postfix:
        if self._postfix is None:
            raise RuntimeError("the upstream is not running")
        return self._postfix

    def _masters(self) -> list[int]:
        pidfiles = [server.pid_file for server in (self._postfix, self._dovecot) if server]
        return [pid for pid in map(read_pid, pidfiles) if pid is not None]

    def cpu_seconds(self) -> float:
        """Postfix's and Dovecot's process trees (not the system under test)."""
        return sum(tree_cpu_seconds(pid) for pid in self._masters())

    def exit_status(self) -> int | None:
        """None while Postfix and Dovecot run; 1 when one of them is gone."""
        alive = [read_stat(pid) is not None for pid in self._masters()]
        return None if len(alive) == 2 and all(alive) else 1

    def received(self) -> int:
        """Messages delivered (discarded) so far: the end-to-end clock stops at the last."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(self._offset)
                new = log.read()
        except FileNotFoundError:
            return 0
        complete = new.rfind(b"\n") + 1  # whole lines only: a word split at the end waits
        self._offset += complete
        lines = new[:complete]
        self._delivered += lines.count(_DELIVERED)
        return self._delivered

    def counts(self) -> HopCounts:
        try:
            return count(self.log_file.read_bytes())
        except FileNotFoundError:
            return count(b"")

    def settled_counts(self, timeout: float = 10.0) -> HopCounts:
        """The counts once every session that connected has logged its disconnect (the
        system under test was stopped before), or as they are at *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.counts()
            if found.disconnected >= found.sessions or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def configure_postfix(directory: Path, pki: certs.PeerPKI, dovecot_auth: Path,
                      defined: list[Listener], ports: dict[str, int]) -> Postfix:
    """main.cf, master.cf and the one lookup table under *directory* (nothing is started)."""
    make_dir(directory, 0o755)
    etc = make_dir(directory / "etc", 0o755)
    make_dir(directory / "queue", 0o755)
    make_dir(directory / "data", 0o700, owner="postfix")
    write_file(directory / "fail-at-rcpt.regexp", FAIL_AT_RCPT)
    write_file(etc / "main.cf", MAIN_CF.format(
        dir=directory, host=HOST, dovecot_auth=dovecot_auth, cert=pki.server.cert_file,
        key=pki.server.key_file))
    write_file(etc / "master.cf", MASTER_CF_BASE + "".join(
        master_cf_lines(lsn, HOST, ports[lsn.name]) for lsn in defined))
    return Postfix(directory=directory, ports={lsn.name: ports[lsn.name] for lsn in defined})
