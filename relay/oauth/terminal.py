"""`sysmail-relay oauth authorize | status | revoke`: signing in from a terminal.

`authorize` runs the authorization-code flow with PKCE against a loopback redirect
(RFC 8252): a one-request HTTP listener on 127.0.0.1 with an ephemeral port receives
the provider's answer. It prints the sign-in address and opens a browser when the
session has a display; when the browser runs on another machine, the address it
ends up at (which does not load there) can be pasted into the terminal instead.
`--device` uses the device authorization grant (RFC 8628) where the provider has
one; a client with `grant = "client_credentials"` or `"service_account"` just fetches
a token. After a new authorization, held mail is made due now and the running daemon
told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import webbrowser
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from html import escape
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from relay.errors import OAuthError, ProviderRefused
from relay.metrics import Metrics
from relay.oauth.manager import (
    SIGN_IN_TTL,
    Authorization,
    OAuth,
    authorization,
    client_settings,
    clock,
    describe,
)
from relay.oauth.providers import ProviderClient
from relay.oauth.store import TokenStore
from relay.settings import Settings

Emit = Callable[[str], None]
PAGE = ("<!doctype html><meta charset=utf-8><title>sysmail-relay</title>"
        "<body style='font-family:sans-serif;margin:3em'><h1>{title}</h1><p>{text}</p>")


def default_client(settings: Settings) -> str:
    """The client of the sending server, else the only one configured."""
    server = settings.active_server
    if server is not None and server.oauth is not None:
        return server.oauth.client
    if len(settings.oauth_clients) == 1:
        return next(iter(settings.oauth_clients))
    known = ", ".join(sorted(settings.oauth_clients)) or "none configured"
    raise OAuthError(f"name the OAuth client: sysmail-relay oauth authorize NAME ({known})")


def authorize(settings: Settings, client: str | None, *, device: bool, browser: bool,
              emit: Emit) -> str:
    """Sign in (or fetch an app token) and store it; returns the resulting status line."""
    name = client or default_client(settings)
    oauth = OAuth(settings, Metrics())
    cfg = client_settings(settings, name)
    if cfg.grant != "authorization_code":
        auth = asyncio.run(oauth.obtain(name))
    elif device:
        auth = asyncio.run(_device(oauth, name, emit))
    else:
        auth = asyncio.run(_sign_in(oauth, name, browser, emit))
    return f"{name}: OAuth authorization {describe(auth)}"


async def _device(oauth: OAuth, client: str, emit: Emit) -> Authorization:
    cfg = client_settings(oauth.settings, client)
    provider = ProviderClient(client, cfg)
    grant = await provider.start_device()
    emit(f"On any device, open {grant.verification_uri} and enter the code "
         f"{grant.user_code}\n(sign in as {oauth.account(client)}; the code is valid until "
         f"{clock(grant.expires_at)}). Waiting ...")
    try:
        data = await provider.poll_device(grant)
    except ProviderRefused as e:
        raise OAuthError(f"the sign-in was not completed ({e.error}); nothing was "
                         "stored") from None
    return await oauth.store_grant(client, oauth.account(client), data)


async def _sign_in(oauth: OAuth, client: str, browser: bool, emit: Emit) -> Authorization:
    async with loopback() as (redirect_uri, answers, outcome):
        url = oauth.start_authorization(client, redirect_uri)
        emit(f"Open this address in a browser and sign in as {oauth.account(client)}:\n\n"
             f"  {url}\n")
        if browser and _has_display():
            await asyncio.to_thread(webbrowser.open, url)
        pasted = _read_pasted(answers, redirect_uri, emit) if sys.stdin.isatty() else None
        try:
            query = await asyncio.wait_for(answers.get(), SIGN_IN_TTL)
        except TimeoutError:
            raise OAuthError(f"no answer from the browser within {SIGN_IN_TTL // 60} "
                             "minutes; nothing was stored: run the command again") from None
        finally:
            if pasted is not None:
                pasted()
        try:
            auth = await oauth.finish_authorization(
                query.get("state", ""), query.get("code"), query.get("error"),
                query.get("error_description"))
        except OAuthError as e:
            outcome.set_result(("Not signed in", str(e)))
            raise
        outcome.set_result(("Signed in", f"OAuth authorization {describe(auth)}. You can "
                                         "close this window."))
        return auth


@contextlib.asynccontextmanager
async def loopback() -> AsyncIterator[tuple[str, asyncio.Queue[dict[str, str]],
                                            asyncio.Future[tuple[str, str]]]]:
    """An HTTP listener on 127.0.0.1, ephemeral port, for the provider's redirect.

    Yields its redirect URI, a queue receiving each answer's query, and a future the
    caller sets to (title, text) for the page the browser then shows.
    """
    answers: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outcome: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def answer(request: web.Request) -> web.Response:
        query = dict(request.query)
        if not {"state", "code", "error"} & set(query):
            return web.Response(status=404, text="not found")
        if outcome.done() or answers.qsize():
            return _page("Already answered", "This sign-in is finished; start a new one "
                         "with `sysmail-relay oauth authorize`.", 400)
        answers.put_nowait(query)
        try:
            title, text = await asyncio.wait_for(asyncio.shield(outcome), 60)
        except TimeoutError:
            title, text = "Not signed in", "the relay did not finish the sign-in"
        return _page(title, text, 200 if title == "Signed in" else 400)

    app = web.Application()
    app.router.add_get("/", answer)
    # access_log=None: the query holds the code, which is never logged
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/", answers, outcome
    finally:
        if not outcome.done():
            outcome.set_result(("Not signed in", "the sign-in was abandoned"))
        await runner.cleanup()


def _page(title: str, text: str, status: int) -> web.Response:
    return web.Response(status=status, content_type="text/html",
                        text=PAGE.format(title=escape(title), text=escape(text)))


def _has_display() -> bool:
    """A graphical browser can open: never start a text browser inside this terminal."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _read_pasted(answers: asyncio.Queue[dict[str, str]], redirect_uri: str,
                 emit: Emit) -> Callable[[], None]:
    """Take the address the browser ended up at from the terminal; returns the stop."""
    emit(f"If the browser runs on another machine, it ends at an address starting with "
         f"{redirect_uri} that does not load: copy it and paste it here.")
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def on_line() -> None:
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(fd)
            return
        parts = urlsplit(line.strip())
        query = dict(parse_qsl(parts.query))
        if {"state", "code", "error"} & set(query):
            answers.put_nowait(query)
        else:
            emit("that is not the address the browser ended at (it has ?state=...&code=...)")

    loop.add_reader(fd, on_line)

    def stop() -> None:
        loop.remove_reader(fd)

    return stop


def status(settings: Settings, as_json: bool) -> str:
    """`oauth status`: every configured client's authorization."""
    store = TokenStore(settings.state_dir / "tokens")
    auths = [authorization(settings, name, store) for name in sorted(settings.oauth_clients)]
    if as_json:
        return json.dumps([asdict(a) for a in auths], indent=2)
    if not auths:
        return "no [oauth_clients] configured"
    lines = []
    for auth in auths:
        lines.append(f"{auth.client}: OAuth authorization {describe(auth)}")
        lines.append(f"  scopes: {' '.join(auth.scopes) or '-'}")
    lines.append(f"token store: {store.directory}")
    return "\n".join(lines)


def revoke(settings: Settings, client: str | None) -> str:
    """`oauth revoke`: revoke at the provider when it can, and forget the token here."""
    name = client or default_client(settings)
    cfg = client_settings(settings, name)
    oauth = OAuth(settings, Metrics())
    account = oauth.account(name)
    store = oauth.store
    path = store.path(name, account)
    token = store.load(name, account, check_mode=False)
    lines: list[str] = []
    if token is not None and (token.refresh_token or token.access_token):
        secret = token.refresh_token or token.access_token or ""
        hint = "refresh_token" if token.refresh_token else "access_token"
        provider = ProviderClient(name, cfg)
        try:
            done = asyncio.run(provider.revoke(secret, hint))
        except OAuthError as e:
            lines.append(f"could not revoke at the provider ({e}): remove the app's access in "
                         f"the account's security settings")
        else:
            lines.append("revoked at the provider" if done else
                         f"{cfg.provider} has no revocation endpoint: remove the app's access "
                         "in the account's settings (Microsoft: My Apps, or revoke the "
                         "user's sessions in Entra ID) if it must stop working at once")
    removed = store.delete(name, account)
    lines.append(f"forgot {path}" if removed else f"no token stored for {name} ({account})")
    lines.append(f"OAuth authorization: Not granted; sign in again with `sysmail-relay oauth "
                 f"authorize {name}`")
    return "\n".join(lines)

