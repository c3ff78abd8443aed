"""A private Dovecot 2.3: passwd-file users, SASL for Postfix, POP3 (STLS, POP3S, APOP).

With an introspection URL it also validates OAuth 2.0 bearer tokens (XOAUTH2,
OAUTHBEARER) for the SASL service ``oauth`` (Postfix's ``smtpd_sasl_service``), by
RFC 7662 introspection against the tests' authorization server; the other services
keep their password mechanisms.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers.certs import CertPair
from tests.peers.netutil import HOST, wait_ports_closed, wait_ports_listening
from tests.peers.procutil import make_dir, require, terminate_pidfile, write_file
from tests.peers.users import Account

INTERNAL_USER = "dovecot"  # Debian's default_internal_user
MAIL_USER, MAIL_GROUP = "nobody", "nogroup"
MECHANISMS = "plain login cram-md5 digest-md5 apop"
OAUTH_MECHANISMS = "xoauth2 oauthbearer"
OAUTH_SERVICE = "oauth"  # the SASL service name the Postfix OAuth listener asks for

OAUTH2_PASSDB = """
# Bearer tokens, only for the {service} service (the Postfix listener "oauth"): each one
# is checked by introspection, no cache, so a revoked or expired token is refused at once.
protocol {service} {{
  passdb {{
    driver = oauth2
    mechanisms = {oauth_mechanisms}
    args = {args}
  }}
}}
"""

OAUTH2_ARGS = """introspection_mode = post
introspection_url = {url}
client_id = {client_id}
client_secret = {client_secret}
username_attribute = username
active_attribute = active
active_value = true
force_introspection = yes
scope = smtp
timeout_msecs = 3000
"""

CONFIG = """# Private Dovecot for sysmail-relay integration tests. Never the system instance.
instance_name = {instance}
base_dir = {run}
state_dir = {state}
listen = {host}
protocols = pop3
shutdown_clients = yes

log_path = {log}
info_log_path = {log}
debug_log_path = {log}
auth_verbose = yes

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2

disable_plaintext_auth = no
auth_mechanisms = {auth_mechanisms}
# Allow UTF-8 user names (the default list is ASCII only) and keep case.
auth_username_chars =
auth_username_format = %u
auth_failure_delay = 0
first_valid_uid = 1

passdb {{
  driver = passwd-file
  mechanisms = {mechanisms}
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={home}/%u allow_all_users=yes
}}
mail_location = maildir:~/Maildir

service anvil {{
  # No auth penalty: every test client is 127.0.0.1.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {auth_socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {pop3s_port}
    ssl = yes
  }}
}}
service pop3 {{
  executable = pop3 pop3-postlogin
}}
service pop3-postlogin {{
  executable = script-login {postlogin}
  user = {internal_user}
  unix_listener pop3-postlogin {{
  }}
}}
"""


@dataclass
class Dovecot:
    directory: Path
    config_file: Path
    log_file: Path
    auth_socket: Path
    pop3_port: int
    pop3s_port: int

    @property
    def pid_file(self) -> Path:
        return self.directory / "run" / "master.pid"

    def start(self, timeout: float = 10.0) -> None:
        # Dovecot's master keeps the stderr it was started with open forever: never a pipe.
        with open(self.directory / "startup.err", "wb") as err:
            rc = subprocess.call(
                [_binary(), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                timeout=timeout,
            )
        if rc != 0:
            raise RuntimeError(
                f"dovecot failed to start (exit {rc}): "
                f"{(self.directory / 'startup.err').read_text(errors='replace')}"
                f"{self.log_file.read_text(errors='replace') if self.log_file.exists() else ''}"
            )
        wait_ports_listening([self.pop3_port, self.pop3s_port], timeout)

    def stop(self, timeout: float = 10.0) -> None:
        terminate_pidfile(self.pid_file, timeout)
        left = wait_ports_closed([self.pop3_port, self.pop3s_port], timeout)
        if left:
            raise TimeoutError(f"dovecot ports {left} still bound after stop")

    def log_text(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")


def _binary() -> str:
    return require("dovecot")


def configure(
    directory: Path,
    cert: CertPair,
    users: tuple[Account, ...],
    postlogin_script: Path,
    pop3_port: int,
    pop3s_port: int,
    introspection: tuple[str, str, str] | None = None,
) -> Dovecot:
    """Write a complete Dovecot configuration under *directory* (nothing is started).

    *introspection* is (URL, client id, client secret) of an RFC 7662 endpoint: with it,
    the SASL service ``oauth`` takes XOAUTH2 and OAUTHBEARER tokens.
    """
    make_dir(directory, 0o755)
    run = make_dir(directory / "run", 0o755)
    state = make_dir(directory / "state", 0o750)
    home = make_dir(directory / "home", 0o755, owner=MAIL_USER)
    for account in users:
        if ":" in account.password or ":" in account.username:
            raise ValueError("a passwd-file field cannot contain ':'")
    passwd = write_file(
        directory / "users.passwd",
        "".join(f"{a.username}:{{PLAIN}}{a.password}::::::\n" for a in users),
        mode=0o640,
        owner=INTERNAL_USER,
    )
    oauth = ""
    if introspection is not None:
        url, client_id, client_secret = introspection
        args = write_file(directory / "oauth2.conf.ext",
                          OAUTH2_ARGS.format(url=url, client_id=client_id,
                                             client_secret=client_secret),
                          mode=0o640, owner=INTERNAL_USER)
        oauth = OAUTH2_PASSDB.format(service=OAUTH_SERVICE, oauth_mechanisms=OAUTH_MECHANISMS,
                                     args=args)
    log = directory / "dovecot.log"
    auth_socket = run / "auth-postfix"  # relative to base_dir in the config
    config = write_file(
        directory / "dovecot.conf",
        CONFIG.format(
            instance=f"peers-{directory.parent.name}",  # unique per session
            run=run,
            state=state,
            host=HOST,
            log=log,
            cert=cert.cert_file,
            key=cert.key_file,
            auth_mechanisms=MECHANISMS + (f" {OAUTH_MECHANISMS}" if oauth else ""),
            mechanisms=MECHANISMS,
            passwd=passwd,
            mail_user=MAIL_USER,
            mail_group=MAIL_GROUP,
            home=home,
            auth_socket=auth_socket.name,
            pop3_port=pop3_port,
            pop3s_port=pop3s_port,
            postlogin=postlogin_script,
            internal_user=INTERNAL_USER,
        )
        + oauth,
    )
    return Dovecot(directory, config, log, auth_socket, pop3_port, pop3s_port)
