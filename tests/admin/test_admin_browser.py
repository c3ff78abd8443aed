"""The admin page in a real browser: Debian's chromium, headless, driven by Playwright.

An operator reads the account details, retries a deferred message, changes the
time-out and the system address (and sees them on the page, in `sysmail-relay
status` and in the next delivery), is told exactly what `check` would say about a
bad value, and signs in with the provider against the test OAuth server.
Screenshots go to test-artifacts/admin/ (see the README).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import smtplib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright
from playwright.async_api import Error as PlaywrightError

from relay.errors import DamagedEntry
from relay.settings import OVERRIDES_FILE
from relay.spool.store import Spool
from tests.oauth_server import CLIENT_ID, CLIENT_SECRET, USER, AuthServer
from tests.support import Daemon, RelayFactory, ScriptedUpstream, free_port, relay_command
from tests.upstream_servers import Script, Servers

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "admin"
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed: apt-get install chromium (.ci/install-peers.sh)")
MESSAGE = ("From: Workflow <workflow@apps.example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
           "\r\nPlease approve request 42.\r\n")


@asynccontextmanager
async def chromium(profile: Path, **options: Any) -> AsyncIterator[BrowserContext]:
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1200, "height": 900}, **options)
        try:
            yield context
        finally:
            await context.close()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def details(page: Page) -> dict[str, str]:
    """The "System e-mail account details" table as label -> value."""
    labels = await page.locator("table.details th").all_inner_texts()
    values = await page.locator("table.details td").all_inner_texts()
    return dict(zip(labels, values, strict=True))


async def eventually(predicate: Callable[[], Any], within: float = 20) -> None:
    """Wait without blocking the loop (the test's SMTP server runs in it)."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def submit(port: int, to: str, subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("workflow@apps.example.com", [to],
                        MESSAGE.format(to=to, subject=subject).encode())
        return ""


def envelope(state: Path, place: str, queue_id: str) -> dict[str, Any] | None:
    try:  # through the spool: an entry is one file, its envelope may be saved beside it
        return dataclasses.asdict(Spool(state / "spool").read(queue_id, place))
    except (FileNotFoundError, DamagedEntry):
        return None


def queued_ids(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "spool" / "queue").iterdir())


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([relay_command(), *args], capture_output=True, text=True, timeout=60)


CONFIG = """
state_dir = "{state}"
[listener]
port = {port}
[system_account]
address = "notify@example.com"
server = "system"
[servers.system]
host = "127.0.0.1"
port = {smtp}
encryption = "none"
[queue]
retry_initial = "1h"
retry_max = "2h"
[admin]
allow_changes = true
"""


async def test_operator_reads_retries_and_changes_the_account_in_the_browser(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    servers = Servers()
    script = Script(rcpt_replies={"boss@example.com": ["451 4.7.1 Greylisted, try again later"]})
    smtp = await servers.smtp(script)
    admin_port, port = free_port(), free_port()
    monkeypatch.setenv("RELAY_ADMIN__PORT", str(admin_port))  # the environment wins
    state, config = tmp_path / "state", tmp_path / "relay.toml"
    config.write_text(CONFIG.format(state=state, port=port, smtp=smtp))
    daemon = Daemon(config, tmp_path / "relay.log", port)
    await asyncio.to_thread(daemon.start)
    base = f"http://127.0.0.1:{admin_port}"
    try:
        await asyncio.to_thread(submit, port, "boss@example.com", "Approval 1")
        await eventually(lambda: queued_ids(state) and "451" in str(
            (envelope(state, "queue", queued_ids(state)[0]) or {}).get("last_reply")))
        (deferred,) = queued_ids(state)
        async with chromium(tmp_path / "profile") as browser:
            page = await browser.new_page()
            await page.goto(base + "/")
            assert await page.locator("h1").inner_text() == "System e-mail account details"
            shown = await details(page)
            assert shown["System e-mail account"] == "Active"
            assert shown["System e-mail address"] == "notify@example.com"
            assert shown["E-mail server to be used"] == \
                "system (Configure e-mail server for system e-mail)"
            assert shown["Outgoing e-mail server name (SMTP)"] == "127.0.0.1"
            assert shown["Outgoing e-mail server port number"] == str(smtp)
            assert (shown["Encryption"], shown["Time-out Period"]) == ("Disable", "10 seconds")
            assert shown["SMTP authentication method"] == "(Unused)"
            row = page.locator("#messages-table tr", has_text=deferred)
            assert "451 4.7.1 Greylisted" in await row.inner_text()
            await shot(page, "01-details-with-a-deferred-message")

            # Retry the deferred message from the page: it goes now, and the reply shows.
            await page.get_by_role("button", name=f"Retry {deferred}").click()
            assert "is due now" in await page.locator(".notice").inner_text()
            await eventually(lambda: len(script.messages) == 1)
            await page.goto(base + "/")
            latest = await page.locator("#latest").inner_text()
            assert deferred in latest and "delivered" in latest and "250 2.0.0 OK queued" in latest
            assert "The queue is empty." in await page.locator("main").inner_text()
            await shot(page, "02-retried-and-delivered")

            # Change the time-out and the system address through the form.
            await page.get_by_role("link", name="Change", exact=True).first.click()
            assert await page.locator("h1").inner_text() == "Change system e-mail account"
            await page.get_by_label("Time-out Period", exact=True).fill("2")
            await page.get_by_label("System e-mail address").fill("alerts@example.com")
            await shot(page, "03-change-form")
            await page.get_by_role("button", name="Save").click()
            assert "new settings are in use" in await page.locator(".notice").inner_text()
            shown = await details(page)
            assert shown["System e-mail address"] == "alerts@example.com"
            assert shown["Time-out Period"] == "2 seconds"
            await shot(page, "04-changed")
            status = await asyncio.to_thread(cli, "status", "--config", str(config))
            assert re.search(r"System e-mail address\s+alerts@example\.com", status.stdout)
            assert re.search(r"Time-out Period\s+2 seconds", status.stdout)

            # The next delivery goes out with both: the new sender, and the new time-out
            # (the server holds its answer to DATA, so the 2 s time-out is what ends it).
            script.data_gate = asyncio.Event()
            await asyncio.to_thread(submit, port, "board@example.com", "Approval 2")
            await eventually(lambda: any(
                "timeout after 2 s" in str((envelope(state, "queue", q) or {}).get("last_reply"))
                for q in queued_ids(state)))
            assert script.mails[-1][0] == "alerts@example.com"
            await page.goto(base + "/")
            assert "timeout after 2 s" in await page.locator("#latest").inner_text()

            # A bad value: the line `check` prints, and nothing changes.
            override = (state / OVERRIDES_FILE).read_bytes()
            await page.get_by_role("link", name="Change", exact=True).first.click()
            await page.get_by_label("System e-mail address").fill("not-an-address")
            await page.get_by_role("button", name="Save").click()
            problems = await page.locator("#problems li").all_inner_texts()
            await shot(page, "05-bad-value-refused")
            bad = tmp_path / "bad.toml"
            bad.write_text(CONFIG.format(state=tmp_path / "elsewhere", port=port, smtp=smtp)
                           .replace("notify@example.com", "not-an-address"))
            check = await asyncio.to_thread(cli, "check", "--config", str(bad))
            assert check.returncode == 2
            assert problems == [line.strip() for line in check.stderr.splitlines()[1:]]
            assert problems == ["system_account.address: 'not-an-address' is not an e-mail "
                                "address of the form local-part@domain"]
            assert (state / OVERRIDES_FILE).read_bytes() == override
            await page.goto(base + "/")
            assert (await details(page))["System e-mail address"] == "alerts@example.com"
    finally:
        if script.data_gate is not None:
            script.data_gate.set()
        await asyncio.to_thread(daemon.stop)
        await servers.close()


async def test_sign_in_with_google_turns_not_granted_into_granted(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    auth = AuthServer().start()
    try:
        relay = await relay_factory(
            upstreams=lambda _settings: ScriptedUpstream(),
            system_account={"address": USER, "server": "gmail"},
            servers={"gmail": {"host": "127.0.0.1", "port": 2, "encryption": "none",
                               "oauth": {"client": "google"}}},
            oauth_clients={"google": {"provider": "google", "client_id": CLIENT_ID,
                                      "client_secret": CLIENT_SECRET,
                                      "authorize_url": f"{auth.url}/authorize",
                                      "token_url": f"{auth.url}/token"}})
        assert relay.admin is not None and relay.admin.address is not None
        base = f"http://127.0.0.1:{relay.admin.address[1]}"
        async with chromium(tmp_path / "profile") as browser:
            page = await browser.new_page()
            await page.goto(base + "/")
            assert (await details(page))["OAuth authorization"].startswith("Not granted")
            await shot(page, "06-oauth-not-granted")
            await page.get_by_role("link", name="Sign in with Google").click()
            await page.wait_for_url(re.compile(r".*/\?done=granted#oauth$"))
            assert auth.count("authorization_code ok") == 1
            assert "OAuth authorization granted." in await page.locator(".notice").inner_text()
            granted = (await details(page))["OAuth authorization"]
            assert granted.startswith(f"Granted as {USER}")
            await shot(page, "07-oauth-granted")
    finally:
        auth.close()


async def test_the_browser_gets_401_without_the_token_and_the_page_with_it(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    token = "browser-" + "k" * 32
    relay = await relay_factory(admin={"token": token})
    assert relay.admin is not None and relay.admin.address is not None
    base = f"http://127.0.0.1:{relay.admin.address[1]}"
    async with chromium(tmp_path / "no-token") as browser:
        page = await browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            await page.goto(base + "/")  # the browser would ask for the token here
        response = await browser.request.get(base + "/")
        assert (response.status, await response.text()) == (401, "401 Unauthorized\n")
    wrong = {"username": "admin", "password": "wrong"}
    async with chromium(tmp_path / "wrong-token", http_credentials=wrong) as browser:
        page = await browser.new_page()
        response = await page.goto(base + "/status")
        assert response is not None and response.status == 401
        assert (await page.locator("body").inner_text()).strip() == "401 Unauthorized"
    right = {"username": "admin", "password": token}
    async with chromium(tmp_path / "token", http_credentials=right) as browser:
        page = await browser.new_page()
        response = await page.goto(base + "/")
        assert response is not None and response.status == 200
        assert (await details(page))["System e-mail account"] == "Active"
