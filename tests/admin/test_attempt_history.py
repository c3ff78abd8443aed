"""`queue show` lists every attempt with the server's reply (issue 20, item 5).

The envelope remembers the last HISTORY attempts (time, server, reply); entries
written by earlier versions, without that list, stay readable.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from relay.admin.queue_view import summary
from relay.spool.envelope import HISTORY, Envelope, Recipient
from tests.admin.test_status_why import DOWN, cli, send, start, wait_for_log
from tests.upstream_servers import Script, Servers


def envelope() -> Envelope:
    return Envelope(id="661F28B623323369AAF25", sender="app@example.com",
                    recipients=[Recipient("a@example.com"), Recipient("b@example.com")])


def test_an_envelope_of_an_earlier_version_without_history_is_read() -> None:
    old = json.loads(envelope().to_json())
    del old["history"]
    old["attempts"] = 3
    env = Envelope.from_json(json.dumps(old).encode())
    assert env.history == [] and env.attempts == 3
    shown = summary({"place": "queue", "path": "/x", **json.loads(env.to_json())})
    assert "attempts      3 (not listed: received by an earlier version)" in shown


def test_the_history_keeps_the_latest_attempts_oldest_first() -> None:
    env = envelope()
    for n in range(HISTORY + 5):
        env.remember(1000.0 + n, "system", {"a@example.com": f"451 4.3.0 try {n}"})
    assert len(env.history) == HISTORY
    assert env.history[0].reply == "451 4.3.0 try 5"
    assert env.history[-1].reply == f"451 4.3.0 try {HISTORY + 4}"
    again = Envelope.from_json(env.to_json())
    assert again.history == env.history


def test_one_reply_for_all_recipients_is_kept_once_different_ones_per_recipient() -> None:
    env = envelope()
    env.remember(1.0, "system", {"a@example.com": "421 4.4.2 timeout",
                                 "b@example.com": "421 4.4.2 timeout"})
    env.remember(2.0, "system", {"a@example.com": "250 2.0.0 OK",
                                 "b@example.com": "550 5.1.1 no such user"})
    assert env.history[0].reply == "421 4.4.2 timeout"
    assert env.history[1].reply == ("<a@example.com>: 250 2.0.0 OK; "
                                    "<b@example.com>: 550 5.1.1 no such user")


@pytest.mark.parametrize("history", ['[{"at": "noon", "server": "s", "reply": "r"}]',
                                     '[{"at": 1}]', '"not a list"', '[["a", "b", "c"]]'])
def test_a_malformed_history_makes_the_envelope_damaged(history: str) -> None:
    raw = envelope().to_json().replace(b'"history":[]', b'"history":' + history.encode())
    with pytest.raises((ValueError, TypeError, KeyError)):
        Envelope.from_json(raw)


async def test_queue_show_lists_every_attempt_with_the_servers_reply(tmp_path: Path) -> None:
    servers = Servers()
    upstream = await servers.smtp(Script(rcpt_replies={
        "later@example.com": ["451 4.2.1 mailbox busy", "550 5.2.1 mailbox disabled"]}))
    daemon, _ = await asyncio.to_thread(start, tmp_path, retry="1s",
                                        server=DOWN.format(upstream=upstream))
    try:
        await asyncio.to_thread(send, daemon.port, ("boss@example.com", "later@example.com"))
        await asyncio.to_thread(wait_for_log, daemon, "dead letter")
        (row,) = json.loads((await asyncio.to_thread(cli, daemon.config, "queue", "list",
                                                     "--json")).stdout)
        shown = await asyncio.to_thread(cli, daemon.config, "queue", "show", row["id"])
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        at = lines.index("  attempts      2")
        first, second = lines[at + 1], lines[at + 2]
        assert "  system  <boss@example.com>: 250" in first
        assert "; <later@example.com>: system (127.0.0.1:" in first
        assert first.endswith("answered 451 4.2.1 mailbox busy to RCPT TO"), first
        assert "  system  system (127.0.0.1:" in second
        assert second.endswith("answered 550 5.2.1 mailbox disabled to RCPT TO"), second
        as_json = await asyncio.to_thread(cli, daemon.config, "queue", "show", row["id"],
                                          "--json")
        history = json.loads(as_json.stdout)["history"]
        assert [a["server"] for a in history] == ["system", "system"]
        assert history[0]["at"] <= history[1]["at"]
        assert history[1]["reply"].endswith("550 5.2.1 mailbox disabled to RCPT TO")
    finally:
        daemon.stop(signal.SIGKILL)
        await servers.close()
