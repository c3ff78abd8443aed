"""The pause after refused logins counts once per pause, against a real server that refuses.

An aiosmtpd server on 127.0.0.1 answers 535 to every login (tests/upstream_servers.py);
several deliveries are in flight at once, as with `pool_size` sessions opening together.
The upstream's clock (`relay.upstream.pacing.time`) is a frozen one that the test moves on,
so the pause's length is read exactly from the log and from `not_before()`, and "the
pause has ended" needs no waiting. The last test runs the installed `sysmail-relay serve`
as the operator did: mail held while the account is inactive goes out at once when a
reload activates it, to a server that refuses the login, and its log has one pause.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import AuthenticationFailure, DeliveryFailure
from relay.metrics import Metrics
from relay.settings import ServerSettings
from relay.spool.store import Envelope, Recipient
from relay.upstream import pacing
from relay.upstream.base import Outgoing
from relay.upstream.smtp_pool import RateLimited, SmtpUpstream
from tests.support import Daemon, free_port
from tests.upstream.test_pop3 import Pop3Stub, running
from tests.upstream_servers import Script, Servers

BODY = b"From: notify@example.com\r\nSubject: disk full\r\n\r\n/var is full.\r\n"
POOL = 5
PAUSE_LINE = re.compile(r"not sending to test for (\d+) s: (\d+) authentication failures")


class FrozenClock:
    """Stands in for the `time` module inside relay.upstream.pacing: `time()` stands still
    until the test moves it; `monotonic()` is the real one (POP windows, timeouts)."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
    frozen = FrozenClock()
    monkeypatch.setattr(pacing, "time", frozen)
    return frozen


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    await started.close()


class Burst:
    """An upstream with POOL sessions to `script`'s server, and messages for it."""

    def __init__(self, tmp_path: Path, port: int, pop_port: int | None = None) -> None:
        self.tmp_path = tmp_path
        login: dict[str, Any] = (
            {"auth": {"method": "PLAIN", "username": "sys", "password": "wrong-password"}}
            if pop_port is None else
            {"pop_before_smtp": {"host": "127.0.0.1", "port": pop_port, "username": "notify",
                                 "password": "wrong-password", "timeout": 5}})
        server = ServerSettings(host="127.0.0.1", port=port, encryption="none", timeout=5,
                                pool_size=POOL, **login)
        self.upstream = SmtpUpstream("test", server, Metrics(), "relay.test")
        self.count = 0

    def message(self) -> Outgoing:
        self.count += 1
        env = Envelope(id=f"MSG{self.count}", sender="app@example.com",
                       recipients=[Recipient("a@example.com")], mail_from="sys@example.com",
                       size=len(BODY))
        path = self.tmp_path / f"message-{self.count}"
        path.write_bytes(BODY)
        return Outgoing(env, path, "sys@example.com", env.recipients, BODY)

    async def fire(self, n: int = POOL) -> list[BaseException | Any]:
        """n deliveries at once, all in flight together; what each raised."""
        return await asyncio.gather(*(self.upstream.deliver(self.message()) for _ in range(n)),
                                    return_exceptions=True)

    def refused_logins(self) -> float | None:
        return self.upstream.metrics.registry.get_sample_value(
            "relay_auth_failures_total", {"server": "test", "method": "PLAIN"})


def pauses(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(seconds, failures) of every auth pause logged so far."""
    return [(int(m[1]), int(m[2])) for r in caplog.records
            if (m := PAUSE_LINE.search(r.getMessage()))]


@pytest.fixture
async def burst(tmp_path: Path, servers: Servers) -> AsyncIterator[tuple[Burst, Script]]:
    script = Script(password="the-right-one")
    made = Burst(tmp_path, await servers.smtp(script))
    yield made, script
    await made.upstream.close()


async def test_logins_refused_in_one_burst_pause_once_for_60_s(
        burst: tuple[Burst, Script], clock: FrozenClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.upstream")
    made, script = burst
    results = await made.fire()
    assert all(isinstance(r, AuthenticationFailure) for r in results), results
    assert script.connections == POOL  # all five were in flight together
    assert made.refused_logins() == POOL  # every refused login is counted in the metric
    assert pauses(caplog) == [(60, 3)]  # but the pause is taken once, for 1 minute
    assert made.upstream.not_before() == clock.now + 60
    with pytest.raises(RateLimited) as held:
        await made.upstream.deliver(made.message())
    assert held.value.retry_at == clock.now + 60
    assert script.connections == POOL  # nothing is tried while paused


async def test_the_next_burst_after_the_pause_doubles_it_once(
        burst: tuple[Burst, Script], clock: FrozenClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.upstream")
    made, script = burst
    await made.fire()
    clock.now += 61  # the first pause is over
    results = await made.fire()
    assert all(isinstance(r, AuthenticationFailure) for r in results), results
    assert script.connections == 2 * POOL
    assert pauses(caplog) == [(60, 3), (120, 4)]
    assert made.upstream.not_before() == clock.now + 120
    clock.now += 121
    await made.fire(1)  # one refused login after a pause is enough: still wrong
    assert pauses(caplog) == [(60, 3), (120, 4), (240, 5)]


async def test_a_login_accepted_after_a_pause_starts_the_count_again(
        burst: tuple[Burst, Script], clock: FrozenClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.upstream")
    made, script = burst
    await made.fire()
    clock.now += 61
    script.password = "wrong-password"  # the operator fixed the account at the server
    results = await made.fire(1)
    assert not any(isinstance(r, DeliveryFailure) for r in results), results
    await made.upstream.close()  # the idle session goes: every delivery below logs in
    script.password = "changed-again"
    for expected in ([(60, 3)], [(60, 3)], [(60, 3), (60, 3)]):
        with pytest.raises(AuthenticationFailure):
            await made.upstream.deliver(made.message())
        assert pauses(caplog) == expected


async def test_a_password_wrong_for_months_pauses_an_hour_at_a_time(
        burst: tuple[Burst, Script], clock: FrozenClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.upstream")
    made, script = burst
    await made.fire(3)
    for _ in range(1100):  # a refused login each time a pause ends: 45 days of pauses
        clock.now = made.upstream.not_before() + 1
        with pytest.raises(AuthenticationFailure):
            await made.upstream.deliver(made.message())
    seconds = [s for s, _ in pauses(caplog)]
    assert seconds[:7] == [60, 120, 240, 480, 960, 1920, 3600]
    assert set(seconds[6:]) == {3600} and len(seconds) == 1101
    assert made.upstream.not_before() == clock.now + 3600
    assert len(script.logins) == 1103  # one login per pause: the account is never hammered


async def test_pop_logins_refused_while_deliveries_wait_pause_once(
        tmp_path: Path, servers: Servers, clock: FrozenClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.upstream")
    script = Script()
    pop = Pop3Stub(users={"notify": "the-right-one"})
    async with running(pop) as pop_port:
        made = Burst(tmp_path, await servers.smtp(script), pop_port)
        results = await made.fire()
        await made.upstream.close()
    refused = [r for r in results if isinstance(r, AuthenticationFailure)]
    assert len(refused) == 3
    assert all(isinstance(r, RateLimited) for r in results if r not in refused), results
    assert sum(line.startswith(b"PASS") for line in pop.received) == 3
    assert made.upstream.metrics.registry.get_sample_value(
        "relay_auth_failures_total", {"server": "test", "method": "POP"}) == 3
    assert pauses(caplog) == [(60, 3)]
    assert script.connections == 0


DAEMON_CONFIG = """
state_dir = "{state}"
[listener]
port = {port}
[system_account]
address = "notify@example.com"
server = "smarthost"
active = {active}
[queue]
retry_initial = "1s"
retry_max = "2s"
[servers.smarthost]
host = "127.0.0.1"
port = {upstream}
encryption = "none"
pool_size = {pool}
auth = {{ method = "PLAIN", username = "sys", password = "wrong-password" }}
"""


async def test_daemon_logs_one_pause_for_a_burst_of_refused_logins(
        tmp_path: Path, servers: Servers) -> None:
    script = Script(password="the-right-one")
    upstream, port = await servers.smtp(script), free_port()
    config = tmp_path / "relay.toml"

    def write(active: bool) -> None:
        config.write_text(DAEMON_CONFIG.format(state=tmp_path / "state", port=port,
                                               upstream=upstream, pool=POOL,
                                               active=str(active).lower()))

    def submit(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for i in range(n):
                client.sendmail("app@example.com", ["a@example.com"],
                                BODY.replace(b"disk full", b"disk full %d" % i))

    def log_lines(pattern: str) -> list[str]:
        return [line for line in daemon.log_text().splitlines() if re.search(pattern, line)]

    async def wait_for_lines(pattern: str, n: int) -> None:
        deadline = time.monotonic() + 30
        while len(log_lines(pattern)) < n:
            assert time.monotonic() < deadline, daemon.log_text()
            await asyncio.sleep(0.05)

    write(active=False)  # the operator deactivated the account; mail is held meanwhile
    daemon = Daemon(config, tmp_path / "relay.log", port)
    await asyncio.to_thread(daemon.start)
    try:
        await asyncio.to_thread(submit, 2 * POOL)
        write(active=True)  # ... and activates it again, with the password still wrong
        daemon.send_signal(signal.SIGHUP)
        await wait_for_lines(r"status=deferred", 2 * POOL)  # every message was taken up
    finally:
        code = await asyncio.to_thread(daemon.stop)
    assert code == 0, daemon.log_text()
    # the burst: pool_size logins at once, and those begun before the 3rd was refused;
    # none once the pause began (the other messages wait for its end without trying)
    assert POOL <= len(script.logins) < 2 * POOL
    assert len(log_lines(r"status=deferred .*not trying smarthost before")) >= 1
    assert script.mails == []
    paused = log_lines(r"not sending to smarthost for")
    assert len(paused) == 1, "\n".join(paused)
    assert "for 60 s: 3 authentication failures in a row" in paused[0]
