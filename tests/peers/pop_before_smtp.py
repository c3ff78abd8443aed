"""POP before SMTP: Dovecot's post-login script writes a record, a Postfix policy reads it.

The record is one file per client IP in ``record_dir``, holding the Unix time of
the last successful POP3 login and the user. The policy (spawn(8), as ``nobody``)
answers OK when that time is within ``window`` seconds, else REJECT.
Both scripts are POSIX sh so they need nothing from the test's Python.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tests.peers.procutil import make_dir, write_file

POSTLOGIN_SCRIPT = """#!/bin/sh
# Dovecot pop3-postlogin: record client IP and login time, then run pop3.
PATH=/usr/bin:/bin
umask 022  # the policy reads the record as nobody
case "$IP" in
  *[!0-9a-fA-F.:]*|'') ;;
  *) printf '%s %s\\n' "$(date +%s)" "$USER" > "{dir}/.$IP.$$" &&
     mv -f "{dir}/.$IP.$$" "{dir}/$IP" ;;
esac
exec "$@"
"""

POLICY_SCRIPT = """#!/bin/sh
# Postfix policy (spawn): allow RCPT only after a recent POP3 login from the client IP.
PATH=/usr/bin:/bin
dir="{dir}"
window={window}
client=
while IFS= read -r line; do
  case "$line" in
    client_address=*) client=${{line#client_address=}} ;;
    '')
      verdict="REJECT 5.7.1 POP before SMTP: no POP3 login from $client in the last $window s"
      case "$client" in
        *[!0-9a-fA-F.:]*|'') ;;
        *)
          if [ -r "$dir/$client" ]; then
            read -r when user < "$dir/$client"
            now=$(date +%s)
            if [ -n "$when" ] && [ $((now - when)) -le "$window" ]; then
              verdict="OK POP before SMTP: $user logged in $((now - when)) s ago"
            fi
          fi ;;
      esac
      printf 'action=%s\\n\\n' "$verdict"
      client= ;;
  esac
done
"""

_IP = re.compile(r"^[0-9a-fA-F.:]+$")


@dataclass(frozen=True)
class PopBeforeSmtp:
    record_dir: Path
    postlogin_script: Path
    policy_script: Path
    window: int

    def clear(self) -> None:
        """Forget every POP3 login, so the next RCPT is refused."""
        for entry in self.record_dir.iterdir():
            entry.unlink(missing_ok=True)

    def last_login(self, ip: str = "127.0.0.1") -> float | None:
        """Unix time of the last recorded POP3 login from *ip*, or None."""
        try:
            return float(self._path(ip).read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def age_login(self, seconds: float, ip: str = "127.0.0.1") -> None:
        """Pretend the last login from *ip* happened *seconds* ago (to test the window)."""
        when = int(time.time() - seconds)
        self._path(ip).write_text(f"{when} aged-by-test\n")

    def _path(self, ip: str) -> Path:
        if not _IP.match(ip):
            raise ValueError(f"not an IP address: {ip!r}")
        return self.record_dir / ip


def setup(directory: Path, window: int, writer_user: str) -> PopBeforeSmtp:
    """Create the record directory (writable by *writer_user*) and both scripts."""
    make_dir(directory, 0o755)
    record_dir = make_dir(directory / "logins", 0o755, owner=writer_user)
    postlogin = write_file(
        directory / "pop3-postlogin.sh", POSTLOGIN_SCRIPT.format(dir=record_dir), mode=0o755
    )
    policy = write_file(
        directory / "policy.sh", POLICY_SCRIPT.format(dir=record_dir, window=window), mode=0o755
    )
    os.chmod(record_dir, 0o755)
    return PopBeforeSmtp(record_dir, postlogin, policy, window)
