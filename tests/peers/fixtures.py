"""pytest fixtures for the real-server peers.

Load with ``pytest_plugins = ["tests.peers.fixtures"]`` in the top-level conftest.

- ``mail_peers`` (session): Postfix + Dovecot + Cyrus SASL, started once, stopped at the end.
- ``smtp_sink`` (session): Postfix's smtp-sink on a free port, for benchmarks.
- ``clean_peers`` (function): ``mail_peers`` with an empty Maildir and no POP3 login record.

They skip (never fail) when the Debian packages are missing: run
``.ci/install-peers.sh`` as root to install them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import peers as _peers
from tests.peers import smtp_sink as _smtp_sink
from tests.peers.peers import MailPeers
from tests.peers.procutil import which
from tests.peers.smtp_sink import SmtpSink

__all__ = ["MailPeers", "SmtpSink", "clean_peers", "mail_peers", "smtp_sink"]

_INSTALL_HINT = "run .ci/install-peers.sh as root"


@pytest.fixture(scope="session")
def mail_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailPeers]:
    missing = _peers.missing_binaries()
    if missing:
        pytest.skip(f"mail peers need {', '.join(missing)} (not installed): {_INSTALL_HINT}")
    keep = tmp_path_factory.mktemp("mail-peers")  # logs and Maildir end up here
    state = _peers.new_state_dir()
    try:
        peers, running = _peers.start(state)
    except BaseException:
        _peers.archive(state, keep)
        raise
    try:
        yield peers
    finally:
        try:
            _peers.stop(running)
        finally:
            _peers.archive(state, keep)


@pytest.fixture
def clean_peers(mail_peers: MailPeers) -> MailPeers:
    """The session's peers with an empty Maildir and no POP3 login on record."""
    mail_peers.clear_maildir()
    mail_peers.clear_pop_before_smtp()
    return mail_peers


@pytest.fixture(scope="session")
def smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    if which("smtp-sink") is None:
        pytest.skip(f"smtp-sink (package postfix) is not installed: {_INSTALL_HINT}")
    sink = _smtp_sink.start(tmp_path_factory.mktemp("smtp-sink") / "smtp-sink.log")
    try:
        yield sink
    finally:
        sink.stop()
