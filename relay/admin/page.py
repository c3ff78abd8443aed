"""The "System e-mail account details" page and what its buttons do.

Server-rendered, no JavaScript: the account in the terms operators know (Active /
Inactive, system e-mail address, outgoing server, encryption, time-out (for a Graph
or Gmail API server: its protocol and API address), authentication, POP before
SMTP, the OAuth credential (a person's sign-in, an app's client secret or
certificate, a service account) and the OAuth authorization Granted / Not granted
with its "Sign in with ..." button), the configuration's warnings (a password sent
in clear, a certificate not checked), the upstream's health (per server: ok,
failing, paused until, not granted, inactive; the last error with its time, the next
attempt, the last success), queue counts, the latest results with the server's
reply, and the waiting and dead messages with Retry and Delete buttons (POST, CSRF
protected). With `Accept: application/json` the buttons, and /queue/retry-all,
answer JSON: that is how `sysmail-relay queue retry|delete` changes the spool while
the daemon holds it. "Send test message" submits through the listener, as an
application does, and shows the listener's and the upstream's answers. Never shows a
secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.admin import queue as queue_admin
from relay.admin.web import ENCRYPTION, QUEUE_ID, RELAY, check_csrf, message, render
from relay.delivery.disk import Result
from relay.delivery.health import HELD_STATES, state_label
from relay.errors import OAuthError, SubmitError
from relay.listener import submit
from relay.settings import LOCAL_SERVER, ServerSettings, Settings, warnings

if TYPE_CHECKING:
    from relay.admin.daemon import Daemon

log = logging.getLogger("relay.admin")

MAX_ROWS = 100
LATEST = 20
_DONE = {
    "retried": "Message {id} is due now: it is sent at once.",
    "deleted": "Message {id} was deleted.",
    "saved": "The system e-mail account was changed and the new settings are in use.",
    "granted": "OAuth authorization granted.",
}
_SIGN_IN = {"google": "Sign in with Google", "microsoft": "Sign in with Microsoft"}


def setup(app: web.Application) -> None:
    app.router.add_get("/", details)
    app.router.add_post("/queue/{id}/retry", retry)
    app.router.add_post("/queue/{id}/delete", delete)
    app.router.add_post("/queue/retry-all", retry_all)
    app.router.add_post("/send-test", send_test)
    app.router.add_get("/oauth/start", oauth_start)
    app.router.add_get("/oauth/callback", oauth_callback)


# --- what the page shows ---------------------------------------------------------------

def account_rows(settings: Settings) -> list[tuple[str, str]]:
    """(label, value) in the seed's terms, in the order of its details screen."""
    account = settings.system_account
    server = settings.active_server
    rows = [("System e-mail account", "Active" if account.active else "Inactive"),
            ("System e-mail address", account.address or "(not set)"),
            ("E-mail server to be used", server_label(account.server, settings))]
    if server is None:
        return [*rows, ("Outgoing e-mail server name (SMTP)",
                        f"built-in outbox {settings.outbox}")]
    if server.http:
        return [*rows, ("Protocol", server.protocol_label), ("API", server.api_url),
                ("Time-out Period", f"{server.timeout} seconds"),
                ("Use OAuth to send e-mails", "Yes (bearer token)")]
    encryption = ENCRYPTION[server.encryption or "none"]
    if server.encryption != "none" and not server.tls_verify:
        encryption += " (certificate NOT verified: tls_verify = false)"
    rows += [("Outgoing e-mail server name (SMTP)", server.host or ""),
             ("Outgoing e-mail server port number", str(server.port)),
             ("Encryption", encryption),
             ("Time-out Period", f"{server.timeout} seconds")]
    return rows + authentication_rows(server)


def authentication_rows(server: ServerSettings) -> list[tuple[str, str]]:
    auth, pop = server.auth, server.pop_before_smtp
    rows: list[tuple[str, str]] = [("SMTP authentication method",
                                    auth.method if auth else "(Unused)")]
    if auth is not None:
        rows += [("Account for sending", auth.username), ("Password for sending", "(set)")]
    rows.append(("Authenticate before sending e-mail (POP before SMTP)",
                 "Set" if pop else "Not set"))
    if pop is not None:
        rows += [("Incoming mail server name", pop.host),
                 ("Incoming e-mail server port number", str(pop.port)),
                 ("Using TLS", ENCRYPTION[pop.encryption]),
                 ("Enable APOP authentication", "Set" if pop.apop else "Not set"),
                 ("Account for receiving", pop.username),
                 ("Time-out Period (incoming)", f"{pop.timeout} seconds"),
                 ("Wait before sending", f"{pop.wait} seconds")]
    rows.append(("Use OAuth to send e-mails", "Yes" if server.oauth else "No"))
    return rows


def server_label(name: str, settings: Settings) -> str:
    if name == LOCAL_SERVER:
        return "local (built-in outbox)"
    described = {"mail": "E-mail server configured for e-mail",
                 "system": "Configure e-mail server for system e-mail"}
    return f"{name} ({described[name]})" if name in described else name


def oauth_state(relay: Daemon) -> dict[str, Any] | None:
    """The OAuth client of the sending server and whether it is granted; None without OAuth."""
    settings = relay.settings
    server = settings.active_server
    if server is None or server.oauth is None:
        return None
    name = server.oauth.client
    client = settings.oauth_clients[name]
    found = relay.oauth.authorization(name)
    sign_in = None
    if client.grant == "authorization_code":
        sign_in = _SIGN_IN.get(client.provider, f"Sign in with {name}")
    return {"client": name, "provider": client.provider, "granted": found.granted,
            "account": found.account, "expires_at": found.expires_at, "reason": found.reason,
            "sign_in": sign_in, "credential": client.credential}


def latest(relay: Daemon) -> list[Result]:
    recent = relay.scheduler.recent if relay.scheduler is not None else []
    return list(reversed(recent))[:LATEST]


async def details(request: web.Request) -> web.Response:
    return await details_page(request)


async def details_page(request: web.Request, status: int = 200,
                       **extra: Any) -> web.Response:
    relay = request.app[RELAY]
    settings = relay.settings
    state = relay.scheduler.server_state() if relay.scheduler is not None else ""
    held = state if state in HELD_STATES else None
    rows = await asyncio.to_thread(queue_admin.entries, relay.spool, held)
    counts = relay.scheduler.counts() if relay.scheduler is not None else {}
    done = request.query.get("done", "")
    queue_id = request.query.get("id", "")
    notice = _DONE[done].format(id=queue_id if QUEUE_ID.match(queue_id) else "")\
        if done in _DONE else None
    context = {
        "rows": account_rows(settings),
        "warnings": warnings(settings),
        "oauth": oauth_state(relay),
        "counts": counts,
        "servers": [{**server, "label": state_label(server)} for server in
                    (relay.scheduler.health_report() if relay.scheduler is not None else [])],
        "oldest": relay.scheduler.oldest_age() if relay.scheduler is not None else 0,
        "latest": latest(relay),
        "fleet": relay.fleet_status(),
        "messages": rows[:MAX_ROWS],
        "more": max(0, len(rows) - MAX_ROWS),
        "notice": notice,
        "test": None,
        "test_to": settings.system_account.address or "",
        **extra,
    }
    return render(request, "details.html", context, status)


# --- the buttons -------------------------------------------------------------------------

async def retry(request: web.Request) -> web.Response:
    return await _queue_action(request, "retry")


async def delete(request: web.Request) -> web.Response:
    return await _queue_action(request, "delete")


async def retry_all(request: web.Request) -> web.Response:
    """Every waiting message due now (`queue retry --all`); JSON only."""
    check_csrf(request, await request.post())
    relay = request.app[RELAY]
    count = await asyncio.to_thread(queue_admin.retry_all, relay.spool)
    log.info("%d waiting messages made due now from the command line", count)
    await relay.rescan()
    return web.json_response({"count": count})


def _wants_json(request: web.Request) -> bool:
    return request.headers.get("Accept", "") == "application/json"


async def _queue_action(request: web.Request, action: str) -> web.Response:
    check_csrf(request, await request.post())
    relay = request.app[RELAY]
    queue_id = request.match_info["id"]
    if not QUEUE_ID.match(queue_id):
        if _wants_json(request):
            return web.json_response({"error": f"{queue_id} is not a queue id"}, status=404)
        return message(request, "No such message", "That is not a queue id.", 404)
    try:
        if action == "retry":
            place = await asyncio.to_thread(queue_admin.retry, relay.spool, queue_id)
        else:
            await asyncio.to_thread(queue_admin.delete, relay.spool, queue_id)
            place = "deleted"
    except queue_admin.QueueItemError as e:
        if _wants_json(request):
            return web.json_response({"error": str(e)}, status=409)
        return message(request, "Cannot change this message", str(e), 409)
    log.info("%s: %s from the admin %s", queue_id,
             "made due now" if action == "retry" else "deleted",
             "listener (command line)" if _wants_json(request) else "page")
    await relay.rescan()
    if _wants_json(request):
        return web.json_response({"id": queue_id, "place": place})
    done = "retried" if action == "retry" else "deleted"
    raise web.HTTPSeeOther(f"/?done={done}&id={queue_id}#messages")


async def send_test(request: web.Request) -> web.Response:
    form = await request.post()
    check_csrf(request, form)
    relay = request.app[RELAY]
    to = str(form.get("to", "")).strip()
    test: dict[str, Any] = {"to": to, "listener": None, "upstream": [], "error": None}
    if relay.listener_address is None:
        test["error"] = "the SMTP listener is not running"
        return await details_page(request, 503, test=test, test_to=to)
    settings = relay.settings
    live = settings.model_copy(update={"listener": settings.listener.model_copy(
        update={"port": relay.listener_address[1]})})
    try:
        reply = await asyncio.to_thread(submit.send_test, live, to)
    except SubmitError as e:
        test["error"] = str(e)
        return await details_page(request, 200, test=test, test_to=to)
    test["listener"] = reply
    queue_id = submit.queue_id_of(reply)
    if queue_id is not None:
        test["queue_id"] = queue_id
        test["upstream"] = await wait_results(relay, queue_id, _answer_within(settings))
    return await details_page(request, 200, test=test, test_to=to)


def _answer_within(settings: Settings) -> float:
    server = settings.active_server
    return min(60.0, 3.0 * (server.timeout if server is not None else 2) + 5.0)


async def wait_results(relay: Daemon, queue_id: str, within: float) -> list[Result]:
    """The upstream's answers for one message, once the first attempt has ended."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if relay.scheduler is not None:
            found = [r for r in relay.scheduler.recent if r.queue_id == queue_id]
            if found:
                return found
            if relay.scheduler.held:
                return []
        await asyncio.sleep(0.05)
    return []


# --- OAuth sign-in -----------------------------------------------------------------------

async def oauth_start(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    client = request.query.get("client", "")
    if client not in relay.settings.oauth_clients:
        return message(request, "No such OAuth client",
                       "That OAuth client is not in [oauth_clients].", 404)
    redirect_uri = f"{request.scheme}://{request.host}/oauth/callback"
    try:
        url = relay.oauth.start_authorization(client, redirect_uri)
    except OAuthError as e:
        return message(request, "Cannot sign in", str(e), 502)
    raise web.HTTPFound(url)


async def oauth_callback(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    query = request.query
    try:
        found = await relay.oauth.finish_authorization(
            query.get("state", ""), query.get("code"), query.get("error"),
            query.get("error_description"))
    except OAuthError as e:
        return message(request, "OAuth authorization: Not granted", str(e), 400)
    if not found.granted:
        return message(request, "OAuth authorization: Not granted",
                       found.reason or "the provider did not grant access", 400)
    log.info("OAuth authorization granted for client %s (%s)", found.client,
             found.account or "account not named")
    raise web.HTTPSeeOther("/?done=granted#oauth")
