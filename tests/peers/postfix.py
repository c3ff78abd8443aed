"""A private Postfix instance: own config dir, queue, logs; delivery into one Maildir."""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers.certs import PeerPKI
from tests.peers.netutil import HOST, wait_ports_closed, wait_ports_listening
from tests.peers.postfix_listeners import (
    POLICY_SERVICE,
    Listener,
    listeners,
    master_cf_lines,
    policy_service_lines,
)
from tests.peers.procutil import make_dir, require, terminate_pidfile, write_file

MESSAGE_SIZE_LIMIT = 10 * 1024 * 1024  # advertised as SIZE
MAIL_USER = "nobody"  # virtual(8) delivers as this user

FAIL_AT_RCPT = r"""# Failure injection at RCPT, by recipient local part.
/^tempfail-[^@]*@/  450 4.2.1 Mailbox temporarily unavailable (injected by test peer)
/^reject-[^@]*@/    550 5.1.1 No such mailbox (injected by test peer)
"""

FAIL_AFTER_DATA = r"""# Injected failure after the final dot: sender, or the only recipient.
/^data451-[^@]*@/   451 4.3.0 Temporary failure after DATA (injected by test peer)
/^data554-[^@]*@/   554 5.7.1 Message refused after DATA (injected by test peer)
"""

SENDER_FIELDS = r"""# cleanup(8) logs each sender field as it splits the header: a second reading
# of what the relay sent (tests/integration/test_rewrite_postfix.py).
/^From[ \t]*:/                                WARN sender field From
/^(Sender|Resent-From|Resent-Sender)[ \t]*:/  WARN sender field other
"""

MAIN_CF = """# Private Postfix for sysmail-relay integration tests. Never the system instance.
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = peer.localhost
mydomain = localhost
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = {host}
inet_protocols = ipv4
smtpd_banner = $myhostname ESMTP sysmail-relay test peer
maillog_file = {dir}/postfix.log
maillog_file_prefixes = {dir}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
notify_classes =
in_flow_delay = 0
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 100
smtpd_hard_error_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_event_limit_exceptions = 0.0.0.0/0

# Every accepted recipient becomes one file in {dir}/mail/Maildir/new.
virtual_mailbox_domains = static:all
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
virtual_mailbox_limit = 0
message_size_limit = {size}

header_checks = regexp:{dir}/sender-fields.regexp
smtpd_relay_restrictions = reject_unauth_destination
peer_fail_injection = check_recipient_access regexp:{dir}/fail-at-rcpt.regexp
smtpd_recipient_restrictions = $peer_fail_injection, permit
# After the final dot Postfix knows the recipient only when there is exactly one;
# the sender rule works for any number of recipients.
smtpd_end_of_data_restrictions =
    check_sender_access regexp:{dir}/fail-after-data.regexp,
    check_recipient_access regexp:{dir}/fail-after-data.regexp

smtpd_sasl_auth_enable = no
smtpd_sasl_authenticated_header = yes
smtpd_sasl_security_options = noanonymous
smtpd_sasl_type = dovecot
# Dovecot offers the bearer-token mechanisms to the OAuth listener only (its own filter).
smtpd_sasl_mechanism_filter = !xoauth2, !oauthbearer, static:all
peer_dovecot_auth_path = {dovecot_auth}
smtpd_sasl_path = $peer_dovecot_auth_path
cyrus_sasl_config_path = {cyrus_dir}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_security_level = none
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
{policy}_time_limit = 3600s
"""

MASTER_CF_BASE = """# service type private unpriv chroot wakeup maxproc command
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
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
virtual   unix  - n n -    - virtual
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Postfix:
    directory: Path
    ports: dict[str, int]

    @property
    def config_dir(self) -> Path:
        return self.directory / "etc"

    @property
    def log_file(self) -> Path:
        return self.directory / "postfix.log"

    @property
    def maildir(self) -> Path:
        return self.directory / "mail" / "Maildir"

    @property
    def pid_file(self) -> Path:
        return self.directory / "queue" / "pid" / "master.pid"

    def start(self, timeout: float = 20.0) -> None:
        proc = subprocess.run(
            [_binary(), "-c", str(self.config_dir), "start"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
        )
        if proc.returncode != 0:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise RuntimeError(
                f"postfix start failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n--- {self.log_file}:\n{log}"
            )
        wait_ports_listening(list(self.ports.values()), timeout)

    def stop(self, timeout: float = 15.0) -> None:
        terminate_pidfile(self.pid_file, timeout)
        # smtpd children may hold the listening sockets a little longer.
        left = wait_ports_closed(list(self.ports.values()), timeout)
        if left:
            raise TimeoutError(f"postfix ports {left} still bound after stop")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def cyrus_config_dir(directory: Path) -> Path:
    """Where this instance's smtpd finds Cyrus SASL's smtpd.conf.

    Debian's Postfix (patch 07_sasl_config) looks in ``$config_directory/sasl``
    and ignores ``cyrus_sasl_config_path``; main.cf sets that too, for other builds.
    """
    return directory / "etc" / "sasl"


def _binary() -> str:
    return require("postfix")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def configure(
    directory: Path,
    pki: PeerPKI,
    ports: dict[str, int],
    dovecot_auth_socket: Path,
    cyrus_config_dir: Path,
    policy_script: Path,
    extra: tuple[Listener, ...] = (),
) -> Postfix:
    """Write main.cf, master.cf and the lookup tables under *directory* (nothing is started).

    *extra* listeners (the OAuth one) come after the standard ones; *ports* names theirs too.
    """
    make_dir(directory, 0o755)
    etc = make_dir(directory / "etc", 0o755)
    make_dir(directory / "queue", 0o755)  # postfix start creates the rest
    make_dir(directory / "data", 0o700, owner="postfix")
    make_dir(directory / "mail", 0o755, owner=MAIL_USER)
    write_file(directory / "fail-at-rcpt.regexp", FAIL_AT_RCPT)
    write_file(directory / "fail-after-data.regexp", FAIL_AFTER_DATA)
    write_file(directory / "sender-fields.regexp", SENDER_FIELDS)
    defined = [*listeners(pki), *extra]
    missing = {listener.name for listener in defined} - set(ports)
    if missing:
        raise ValueError(f"no port for listeners {sorted(missing)}")
    write_file(
        etc / "main.cf",
        MAIN_CF.format(
            dir=directory,
            host=HOST,
            uid=pwd.getpwnam(MAIL_USER).pw_uid,
            size=MESSAGE_SIZE_LIMIT,
            dovecot_auth=dovecot_auth_socket,
            cyrus_dir=cyrus_config_dir,
            cert=pki.server.cert_file,
            key=pki.server.key_file,
            policy=POLICY_SERVICE,
        ),
    )
    write_file(
        etc / "master.cf",
        MASTER_CF_BASE
        + policy_service_lines(policy_script)
        + "".join(master_cf_lines(lsn, HOST, ports[lsn.name]) for lsn in defined),
    )
    return Postfix(directory=directory, ports={lsn.name: ports[lsn.name] for lsn in defined})
