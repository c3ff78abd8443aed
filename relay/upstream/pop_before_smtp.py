"""POP before SMTP: the POP3 login that makes a server let this address send.

`pop_login` logs in to a POP3 server and out again through the POP3 client
(relay.upstream.pop3); `pop_before_smtp` does it for `servers.NAME.pop_before_smtp`
and turns its errors into AuthenticationFailure (the POP
server refused the login) or TemporaryFailure (unreachable, timeout, TLS), each with
the server's answer and the full key to change. When to log in again (the `window`)
is the pool's business (relay.upstream.smtp_pool).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable

from relay.errors import AuthenticationFailure, Pop3Error, TemporaryFailure
from relay.settings import ServerSettings
from relay.upstream.network import tls_context
from relay.upstream.pop3 import Encryption, OnStep, Pop3Client

Step = Callable[[str, float, str], None]


async def pop_before_smtp(name: str, server: ServerSettings,
                          on_step: Step | None = None) -> str:
    """Log in to the server's POP3 account so that it lets this address send.

    Raises AuthenticationFailure (the POP server refused the login) or
    TemporaryFailure (unreachable, timeout, TLS), with the POP server's answer.
    """
    pop = server.pop_before_smtp
    assert pop is not None and pop.port is not None
    where = f"{name}: POP before SMTP at {pop.host}:{pop.port}"
    context = (tls_context(server, pop.ca_file,
                           f"servers.{name}.pop_before_smtp.ca_file" if pop.ca_file
                           else f"servers.{name}.ca_file")
               if pop.encryption != "none" else None)

    def step(stage: str, seconds: float, answer: str) -> None:
        if on_step is not None:
            on_step(f"POP {stage}", seconds, answer)

    try:
        return await pop_login(
            pop.host, pop.port, encryption=pop.encryption, ssl_context=context,
            timeout=pop.timeout, username=pop.username, password=pop.secret(), apop=pop.apop,
            on_step=step)
    except Pop3Error as e:
        reply = _pop_fix(name, e)
        if on_step is not None:
            on_step(f"POP {e.stage or 'login'}", 0.0, f"FAILED: {reply}")
        refused = e.stage in ("USER", "PASS", "APOP") and not isinstance(e, TimeoutError)
        kind = AuthenticationFailure if refused else TemporaryFailure
        raise kind(f"{where}: {reply}", stage=f"POP {e.stage or 'login'}") from None


def _pop_fix(name: str, error: Pop3Error) -> str:
    """The POP server's answer with the full key to change (servers.NAME.pop_before_smtp.*)."""
    key = f"servers.{name}.pop_before_smtp"
    reply = re.sub(r"(?<![\w.])pop_before_smtp\.", f"{key}.", error.reply)
    if "pop_before_smtp" in error.reply or "ca_file" in error.reply:
        return reply.replace("with ca_file", f"with {key}.ca_file")
    if isinstance(error, TimeoutError):
        return (f"{reply}; check {key}.host and port (995 with encryption = \"tls\", 110 "
                f"otherwise), or raise {key}.timeout")
    return f"{reply}; check {key}.host, port and encryption"


async def pop_login(
    host: str,
    port: int,
    *,
    encryption: Encryption,
    ssl_context: ssl.SSLContext | None,
    timeout: float,  # noqa: ASYNC109 - bounds each step, not the whole call
    username: str,
    password: str,
    apop: bool,
    on_step: OnStep | None = None,
) -> str:
    """Log in to a POP3 server and log out again (POP before SMTP); return the login's +OK text.

    `on_step`, if given, hears of each step that succeeded (connect, TLS handshake,
    greeting, CAPA, STLS, USER, PASS or APOP, QUIT): for `check --connect`.
    """
    client = await Pop3Client.connect(
        host, port, encryption=encryption, ssl_context=ssl_context, timeout=timeout, on_step=on_step
    )
    async with client:
        return await client.login(username, password, apop=apop)
