"""The sendmail drop-in starts light: cron and applications run it for every message."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("aiohttp", "authlib", "httpx", "aiosmtpd", "aiosmtplib", "jinja2",
         "prometheus_client", "relay.app", "relay.admin", "relay.oauth", "relay.upstream",
         "relay.delivery", "cryptography", "joserfc")


def loaded_after(statement: str) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print('\\n'.join(m for m in sys.modules if m.startswith({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return sorted(set(out.split()))


def test_the_command_line_and_the_sendmail_drop_in_load_no_daemon_http_or_oauth_code() -> None:
    assert loaded_after("from relay import cli; cli.build_parser()") == []
    assert loaded_after("from relay.listener import submit") == []


def test_the_probe_sees_a_heavy_import() -> None:
    assert "relay.app" in loaded_after("from relay import app")
