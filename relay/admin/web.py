"""What the admin pages share: the application's keys, templates and CSRF protection.

Templates are jinja2 with autoescape on, from `relay/admin/templates`. Every form
carries a CSRF token that must equal the `relay_csrf` cookie (SameSite=Strict,
HttpOnly), and a POST whose Origin or Sec-Fetch-Site shows another site is refused.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

if TYPE_CHECKING:
    from relay.admin.daemon import Daemon

RELAY: web.AppKey[Daemon] = web.AppKey("relay")
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("templates")
CSRF_COOKIE = "relay_csrf"
QUEUE_ID = re.compile(r"^[0-9A-F]{21}$")

ENCRYPTION = {"none": "Disable", "tls": "Use TLS", "starttls": "Use STARTTLS"}


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("relay.admin", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["age"] = _age
    env.filters["zip_pairs"] = lambda values: [(v, v) for v in values]
    return env


def _when(epoch: float | None) -> str:
    if not epoch:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _age(seconds: float | int | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def csrf_token(request: web.Request) -> tuple[str, bool]:
    """The browser's CSRF token, and whether it is new (then it must be set as the cookie)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
        return token, False
    return secrets.token_urlsafe(32), True


def check_csrf(request: web.Request, form: Mapping[str, Any]) -> None:
    """Raise 403 unless the POST comes from one of our own forms."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = str(form.get("csrf", ""))
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site", "same-origin")
    own = f"{request.scheme}://{request.host}"
    if (not cookie or not hmac.compare_digest(cookie.encode(), sent.encode())
            or (origin is not None and origin != own) or site not in ("same-origin", "none")):
        raise web.HTTPForbidden(text="403 Forbidden: this form did not come from the admin page "
                                     "or has expired; reload the page and try again.\n")


def render(request: web.Request, name: str, context: Mapping[str, Any],
           status: int = 200) -> web.Response:
    relay = request.app[RELAY]
    token, new = csrf_token(request)
    body = request.app[TEMPLATES].get_template(name).render(
        csrf=token, allow_changes=relay.settings.admin.allow_changes, **context)
    response = web.Response(text=body, status=status, content_type="text/html")
    if new:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict", path="/")
    return response


def message(request: web.Request, title: str, text: str, status: int) -> web.Response:
    """A short page that says what went wrong and links back to the details."""
    return render(request, "message.html", {"title": title, "text": text}, status)
