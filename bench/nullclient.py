"""A private Postfix null client: relayhost + sender_canonical_maps, its queue on disk.

The configuration an operator writes to have Postfix do sysmail-relay's job:
accept on 127.0.0.1, rewrite every sender to the system address, relay
everything to one upstream. Everything else is Postfix's default (process
limits, destination concurrency 20, connection cache on demand, in_flow_delay),
plus what a private instance needs on these machines (PEER-NOTES.md): its own
queue and data directories, a log file through postlogd, `chroot = n`.

For scenario T (`TlsHop`) the hop to the upstream wants STARTTLS and AUTH PLAIN:
TLS required and verified against the upstream's CA, SASL with a password map,
the TLS session cache and `smtp_tls_connection_reuse` (tlsproxy), without which
Postfix caches no TLS connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import read_stat, tree_cpu_seconds, tree_names
from bench.relay_instance import SYSTEM_ADDRESS
from tests.peers.netutil import HOST, free_ports
from tests.peers.postfix import Postfix
from tests.peers.procutil import grant_traverse, make_dir, read_pid, write_file

SMTPD = "smtpd"
_PENDING_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

MAIN_CF = """# Postfix null client under benchmark (written by bench/run.py)
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = nullclient.localhost
mydomain = localhost
myorigin = $myhostname
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8

# The null client: nothing is local, everything goes to the relay host.
mydestination =
local_transport = error:local delivery is disabled
relayhost = [{host}]:{sink_port}
sender_canonical_maps = static:{address}

alias_maps =
alias_database =
biff = no
notify_classes =
maillog_file = {dir}/postfix.log
maillog_file_prefixes = {dir}
"""

TLS_HOP = """
# Scenario T: the hop to the upstream wants STARTTLS and a login (AUTH PLAIN), as the
# relay's [servers.sink] does; Postfix's connection and TLS session caches are on.
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca_file}
smtp_tls_session_cache_database = btree:{dir}/data/smtp_scache
smtp_tls_connection_reuse = {reuse}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{dir}/etc/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_sasl_mechanism_filter = plain
smtp_connection_cache_on_demand = yes
"""

MASTER_CF = """# service type private unpriv chroot wakeup maxproc command
{host}:{port} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
proxywrite unix - - n -    1 proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsproxy  unix  - - n -    0 tlsproxy
"""


@dataclass(frozen=True)
class TlsHop:
    """Scenario T's upstream hop: STARTTLS with this CA, AUTH PLAIN with this login."""

    ca_file: Path
    username: str
    password: str
    connection_reuse: bool = True
    """smtp_tls_connection_reuse: without it Postfix caches no TLS connection at all
    (each delivery opens one, with its own TLS handshake and AUTH)."""


@dataclass
class NullClient:
    postfix: Postfix

    @property
    def port(self) -> int:
        return self.postfix.ports[SMTPD]

    @property
    def queue_dir(self) -> Path:
        return self.postfix.directory / "queue"

    def master_pid(self) -> int | None:
        return read_pid(self.postfix.pid_file)

    def alive(self) -> bool:
        pid = self.master_pid()
        return pid is not None and read_stat(pid) is not None

    def cpu_seconds(self) -> float:
        """Master plus every process it started (smtpd, cleanup, qmgr, smtp, ...)."""
        pid = self.master_pid()
        return 0.0 if pid is None else tree_cpu_seconds(pid)

    def process_names(self) -> dict[str, int]:
        pid = self.master_pid()
        return {} if pid is None else tree_names(pid)

    def pending(self) -> int:
        return sum(_count_files(self.queue_dir / name) for name in _PENDING_QUEUES)

    def failed(self) -> int:
        return _count_files(self.queue_dir / "deferred") + _count_files(self.queue_dir / "bounce")

    def stop(self) -> None:
        self.postfix.stop()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.postfix.log_text().splitlines()[-lines:])


def configure(directory: Path, sink_port: int, hop: TlsHop | None = None) -> NullClient:
    """Write the instance's files under *directory* (nothing is started); *hop*: STARTTLS
    and AUTH PLAIN to the upstream (scenario T), else plain SMTP (B)."""
    make_dir(directory, 0o755)
    grant_traverse(directory)  # postfix-owned daemons must reach the queue
    etc = make_dir(directory / "etc", 0o755)
    make_dir(directory / "queue", 0o755)  # postfix start creates the rest
    make_dir(directory / "data", 0o700, owner="postfix")
    (port,) = free_ports(1)
    main_cf = MAIN_CF.format(dir=directory, host=HOST, sink_port=sink_port,
                             address=SYSTEM_ADDRESS)
    if hop is not None:
        main_cf += TLS_HOP.format(dir=directory, ca_file=hop.ca_file,
                                  reuse="yes" if hop.connection_reuse else "no")
        # Looked up by the next hop, as relayhost names it; opened before the smtp
        # processes drop root, so mode 0600 like a postmap'ed sasl_passwd.db.
        write_file(etc / "sasl_passwd", f"[{HOST}]:{sink_port} {hop.username}:{hop.password}\n",
                   mode=0o600)
    write_file(etc / "main.cf", main_cf)
    write_file(etc / "master.cf", MASTER_CF.format(host=HOST, port=port))
    return NullClient(Postfix(directory=directory, ports={SMTPD: port}))


def start_null_client(directory: Path, sink_port: int, hop: TlsHop | None = None) -> NullClient:
    client = configure(directory, sink_port, hop)
    try:
        client.postfix.start()
    except BaseException:
        client.stop()
        raise
    return client


def _count_files(directory: Path) -> int:
    """Queue files under a (possibly hashed) Postfix queue directory."""
    count = 0
    for _root, _dirs, files in os.walk(directory):
        count += len(files)
    return count
