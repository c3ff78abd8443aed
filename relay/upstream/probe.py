"""`check --connect`: open an upstream session step by step and print each step.

The probe runs what a delivery runs before its first message (POP before SMTP
when configured, connect, TLS, EHLO, STARTTLS, AUTH or the OAuth token), prints
one line per step with its time and the server's answer, and QUITs. A failing
step prints FAILED, the reply or local error and the fix; nothing ends in a
traceback. It sends no mail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.errors import DeliveryFailure
from relay.settings import ServerSettings
from relay.upstream.base import explain
from relay.upstream.pop_before_smtp import pop_before_smtp
from relay.upstream.smtp import Session

if TYPE_CHECKING:
    from relay.oauth.manager import OAuth


async def probe(name: str, server: ServerSettings, hostname: str,
                emit: Callable[[str], None], oauth: OAuth | None = None) -> bool:
    """Open a session to `servers.NAME` step by step, `emit` one line per step, QUIT.

    True when every step passed."""
    failed = False

    def step(stage: str, seconds: float, answer: str) -> None:
        nonlocal failed
        failed = failed or answer.startswith("FAILED")
        emit(f"{stage:<16} {seconds * 1000:7.1f} ms  {explain(answer)}")

    session: Session | None = None
    try:
        session = Session(name, server, hostname, on_step=step, oauth=oauth)
        if server.pop_before_smtp is not None:
            await pop_before_smtp(name, server, on_step=step)
            if server.pop_before_smtp.wait:
                await asyncio.sleep(server.pop_before_smtp.wait)
        await session.open()
    except DeliveryFailure as e:
        if not failed:  # a failure found before any step ran (the TLS setup)
            step(e.stage or "connect", 0.0, f"FAILED: {e.reply}")
        if session is not None:
            await session.quit()
        return False
    except Exception as e:  # a bug: still one line with what happened, not a traceback
        step(session.stage if session else "setup", 0.0,
             f"FAILED: internal error in the relay: {e!r}; please report it")
        if session is not None:
            await session.quit()
        return False
    started = time.monotonic()
    await session.quit()
    step("QUIT", time.monotonic() - started, "closed")
    return True
