"""The admin listener: metrics, health, status and the account page, over HTTP.

aiohttp.web in the daemon's own event loop (an AppRunner and one TCPSite; no
signal handlers of its own). Endpoints:

    GET  /metrics    Prometheus text exposition of the relay's own registry
    GET  /healthz    200 while the process serves
    GET  /readyz     200 when the SMTP listener is bound and the spool writable, else 503 + why:
                     whether mail is accepted, not whether the upstream takes it (that is
                     /status "servers" and relay_upstream_up)
    GET  /status     JSON: what `sysmail-relay status` shows, with the scheduler's live counts
                     and, per server, its state, last error, next attempt and last success
    GET  /           the "System e-mail account details" page (relay.admin.page)
    GET|POST /change the "Change system e-mail account" form (relay.admin.change)

Access: bound to loopback by default. Bound elsewhere, `admin.token` (or
`token_file`) is required to start, and every request must carry it, as a bearer
token or as the password of HTTP Basic authentication (so a browser can ask for
it); a wrong or missing one gets a bare 401. Without a token only loopback host
names are accepted in the Host header, which defeats DNS rebinding. Every response
carries headers that forbid framing and sniffing and a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import os
import secrets
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.admin import change as admin_change
from relay.admin import page as admin_page
from relay.admin import status
from relay.admin.web import RELAY, TEMPLATES, templates
from relay.errors import ConfigError
from relay.settings import AdminSettings, admin_token

if TYPE_CHECKING:
    from relay.admin.daemon import Daemon

log = logging.getLogger("relay.admin")

ACCESS: web.AppKey[Access] = web.AppKey("access")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Access:
    """Who may use the admin listener: the token check and the Host check."""

    def __init__(self, admin: AdminSettings) -> None:
        self.loopback = is_loopback(admin.host)
        self.token = admin_token(admin)
        self._admin = admin
        if not self.loopback and self.token is None:
            raise ConfigError([
                f"admin.host = {admin.host!r} is not a loopback address: set admin.token_file "
                "(or admin.token) so that every request must carry the token, or set "
                "admin.host = \"127.0.0.1\""])

    def update(self, admin: AdminSettings) -> None:
        """After a reload: take a new token; never drop to none (fail closed)."""
        if admin is self._admin:
            return
        self._admin = admin
        try:
            self.token = admin_token(admin) or self.token
        except ConfigError as e:
            log.error("admin token not changed: %s", "; ".join(e.problems))

    def allows(self, request: web.Request) -> bool:
        if self.token is None:
            return self.loopback and _loopback_host(request)
        offered = _offered_token(request.headers.get("Authorization", ""))
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def _offered_token(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def _loopback_host(request: web.Request) -> bool:
    host = request.url.host or ""
    return is_loopback(host)


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    access: Access = request.app[ACCESS]
    access.update(request.app[RELAY].settings.admin)
    if not access.allows(request):
        log.info("admin: refused %s %s from %s (no valid token or not a loopback host name)",
                 request.method, request.path, request.remote)
        raise web.HTTPUnauthorized(
            text="401 Unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="sysmail-relay", charset="UTF-8"'})
    response: web.StreamResponse = await handler(request)
    return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")


# --- the machine-readable endpoints -------------------------------------------------------

async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RELAY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    problems = await not_ready(request.app[RELAY])
    if problems:
        return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n")
    return web.Response(text="ready\n")


async def not_ready(relay: Daemon) -> list[str]:
    """Why the relay cannot take mail now; empty when it can."""
    problems: list[str] = []
    if relay.stopping:
        problems.append("the relay is stopping")
    if relay.listener_address is None:
        problems.append("the SMTP listener is not bound")
    try:
        await asyncio.to_thread(_probe_spool, relay)
    except OSError as e:
        where = e.filename or relay.spool.root / "incoming"
        problems.append(f"the spool is not writable: {where}: {e.strerror}")
    return problems


def _probe_spool(relay: Daemon) -> None:
    path = relay.spool.root / "incoming" / f".ready-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ready")
    finally:
        os.close(fd)
        os.unlink(path)


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(await live_status(request.app[RELAY]))


async def live_status(relay: Daemon) -> dict[str, Any]:
    """`status.collect()` and what only the running daemon knows."""
    report = await asyncio.to_thread(status.collect, relay.settings)
    live: dict[str, Any] = {}
    report["daemon"] = {"running": True, "pid": os.getpid()}
    if relay.scheduler is not None:
        counts = relay.scheduler.counts()
        live["queue"] = counts
        live["oldest_seconds"] = round(relay.scheduler.oldest_age(), 1)
        report["servers"] = relay.scheduler.health_report()
        if report["queue"] is not None:  # the daemon's view of what waits, and why
            report["queue"].update(counts, oldest_seconds=live["oldest_seconds"])
    if relay.listener_address is not None:
        live["listener"] = "{}:{}".format(*relay.listener_address)
    if (fleet := relay.fleet_status()) is not None:
        report["fleet"] = fleet
    report["live"] = live
    return report


async def stylesheet(request: web.Request) -> web.Response:
    css = resources.files("relay.admin").joinpath("templates", "admin.css").read_text("utf-8")
    return web.Response(text=css, content_type="text/css",
                        headers={"Cache-Control": "max-age=300"})


# --- the listener ---------------------------------------------------------------------------

def build_app(relay: Daemon, access: Access) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[RELAY] = relay
    app[ACCESS] = access
    app[TEMPLATES] = templates()
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_json)
    app.router.add_get("/admin.css", stylesheet)
    admin_page.setup(app)
    admin_change.setup(app)
    return app


class AdminServer:
    """The admin HTTP listener of one relay."""

    def __init__(self, relay: Daemon) -> None:
        """Raises ConfigError when a non-loopback address has no token."""
        self.relay = relay
        self.access = Access(relay.settings.admin)
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        cfg = self.relay.settings.admin
        runner = web.AppRunner(build_app(self.relay, self.access), access_log=None,
                               handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(e.errno, f"the admin listener cannot listen on {cfg.host} port "
                                   f"{cfg.port}: {e.strerror}; free the port or set admin.port "
                                   "(admin.host)") from None
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.address = (host, port)
        shown = f"[{host}]" if ":" in host else host
        log.info("admin listener on http://%s:%d/ (metrics, status, account page%s)", shown,
                 port, "; token required" if self.access.token else "")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
