"""What relay.listener.aiosmtpd_internals takes from aiosmtpd exists in the installed
release, and no other module of relay/ takes anything private from aiosmtpd.

When an aiosmtpd release removes or changes a private member, these tests fail
naming it, instead of intake breaking silently.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import tomllib
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.listener import aiosmtpd_internals
from relay.listener.aiosmtpd_internals import PRIVATE_NAMES, RELIED_ON

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "relay"
INTERNALS = RELAY / "listener" / "aiosmtpd_internals.py"
AIOSMTPD = version("aiosmtpd")


def missing(member: str, why: str) -> str:
    return (f"aiosmtpd {AIOSMTPD}: {member} is gone or changed, and "
            f"relay.listener.aiosmtpd_internals relies on it ({why}). Adapt that module to "
            f"this release, or keep aiosmtpd below it in pyproject.toml.")


class Hooks:
    """A handler with one hook, to see how aiosmtpd finds hooks."""

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 the handler's NOOP"


class HiddenHooks(Hooks):
    def __dir__(self) -> list[str]:
        return []


async def exchange(make: Callable[[], SMTP], lines: list[bytes]) -> tuple[list[SMTP], list[bytes]]:
    """Serve `make()` on a real socket (port 0), send `lines`, return the protocols made
    and the replies."""
    made: list[SMTP] = []

    def factory() -> SMTP:
        made.append(make())
        return made[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for line in lines:
        writer.write(line + b"\r\n")
        replies.append(await reader.readline())
    writer.write(b"QUIT\r\n")
    await reader.read()  # the server closes its side after 221
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return made, replies


@pytest.fixture
async def connected() -> AsyncIterator[SMTP]:
    """An aiosmtpd SMTP session with a client connected (after its greeting)."""
    loop = asyncio.get_running_loop()
    made, replies = await asyncio.wait_for(
        exchange(lambda: SMTP(Hooks(), loop=loop, hostname="h"), [b"NOOP"]), 10)
    assert replies[1].startswith(b"250")
    yield made[0]


def check_reader(smtp: SMTP) -> None:
    assert isinstance(getattr(smtp, "_reader", None), asyncio.StreamReader), missing(
        "SMTP._reader (an asyncio.StreamReader once connected)", PRIVATE_NAMES["SMTP._reader"])


def check_getaddr(smtp: SMTP) -> None:
    why = PRIVATE_NAMES["SMTP._getaddr"]
    method = getattr(SMTP, "_getaddr", None)
    assert callable(method), missing("SMTP._getaddr", why)
    assert list(inspect.signature(method).parameters) == ["self", "arg"], missing(
        "the signature of SMTP._getaddr(self, arg)", why)
    assert method(smtp, "<a.b@example.com>  SIZE=10") == ("a.b@example.com", "SIZE=10"), \
        missing("what SMTP._getaddr returns: (address, the rest)", why)
    assert method(smtp, "<a@b@c>") == (None, None), missing("SMTP._getaddr's refusal", why)


def check_method(name: str, parameters: list[str]) -> Callable[[Any], None]:
    def check(smtp: Any) -> None:
        method = getattr(SMTP, name, None)
        assert callable(method), missing(f"SMTP.{name}", PRIVATE_NAMES[f"SMTP.{name}"])
        assert list(inspect.signature(method).parameters) == parameters, missing(
            f"the signature of SMTP.{name}({', '.join(parameters)})",
            PRIVATE_NAMES[f"SMTP.{name}"])
    return check


def check_timer(smtp: SMTP) -> None:
    assert isinstance(getattr(smtp, "_timeout_handle", None), asyncio.TimerHandle), missing(
        "SMTP._timeout_handle (the idle timer)", PRIVATE_NAMES["SMTP._timeout_handle"])


def check_duration(smtp: SMTP) -> None:
    assert getattr(smtp, "_timeout_duration", None) == 300, missing(
        "SMTP._timeout_duration (SMTP(timeout=...))", PRIVATE_NAMES["SMTP._timeout_duration"])


CHECKS: dict[str, Callable[[Any], None]] = {
    "SMTP._reader": check_reader,
    "SMTP._getaddr": check_getaddr,
    "SMTP._reset_timeout": check_method("_reset_timeout", ["self", "duration"]),
    "SMTP._timeout_cb": check_method("_timeout_cb", ["self"]),
    "SMTP._timeout_handle": check_timer,
    "SMTP._timeout_duration": check_duration,
}


STATIC = {"SMTP._reset_timeout", "SMTP._timeout_cb"}
"""Checked on the class alone, before any session (which aiosmtpd may no longer run)."""


def test_each_private_name_relied_on_has_a_check() -> None:
    assert set(PRIVATE_NAMES) == set(CHECKS), "PRIVATE_NAMES and this test's CHECKS differ"


@pytest.mark.parametrize("name", sorted(STATIC))
def test_each_private_method_relied_on_is_in_the_installed_aiosmtpd(name: str) -> None:
    CHECKS[name](SMTP)


@pytest.mark.parametrize("name", sorted(set(PRIVATE_NAMES) - STATIC))
async def test_each_private_member_of_a_session_relied_on_is_in_the_installed_aiosmtpd(
        name: str, connected: SMTP) -> None:
    CHECKS[name](connected)


async def test_aiosmtpd_finds_commands_and_hooks_through_dir() -> None:
    """Shortcuts.__dir__ and quick_hooks list only what aiosmtpd looks for; that works
    only while aiosmtpd looks with dir() (RELIED_ON['dir'])."""
    loop = asyncio.get_running_loop()

    class Extra(SMTP):
        async def smtp_XYZZY(self, arg: str | None) -> None:
            await self.push("250 XYZZY")

    class HiddenExtra(Extra):
        def __dir__(self) -> list[str]:
            return [n for n in object.__dir__(self) if n != "smtp_XYZZY"]

    _, seen = await exchange(lambda: Extra(Hooks(), loop=loop), [b"NOOP", b"XYZZY"])
    _, hidden = await exchange(lambda: HiddenExtra(HiddenHooks(), loop=loop), [b"NOOP", b"XYZZY"])
    assert seen[1:] == [b"250 the handler's NOOP\r\n", b"250 XYZZY\r\n"]
    assert hidden[1] == b"250 OK\r\n", missing("finding handler hooks by dir()", RELIED_ON["dir"])
    assert hidden[2].startswith(b"500 "), missing("finding smtp_* by dir()", RELIED_ON["dir"])


async def test_aiosmtpd_tells_the_ehlo_hook_form_from_its_signature() -> None:
    loop = asyncio.get_running_loop()

    class Handler:
        async def handle_EHLO(self, *args: Any) -> list[str]:
            return list(args[-1])

    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for n in ("self", "server", "session", "envelope", "hostname", "responses")]
    Handler.handle_EHLO.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    _, replies = await exchange(lambda: SMTP(Handler(), loop=loop, hostname="h"),
                                [b"EHLO client"])
    assert replies[1] == b"250-h\r\n", missing("reading handle_EHLO's inspect.signature()",
                                               RELIED_ON["signature"])


def test_pyproject_keeps_aiosmtpd_below_the_next_minor_release() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "aiosmtpd>=1.4.6,<1.5" in pyproject["project"]["dependencies"], \
        "relay.listener.aiosmtpd_internals exists: pin aiosmtpd>=1.4.6,<1.5 in pyproject.toml"
    assert AIOSMTPD.startswith("1.4."), AIOSMTPD


# --- no other module touches aiosmtpd's private names -------------------------------


def aiosmtpd_private_names(connected: SMTP) -> set[str]:
    """Every private name of an aiosmtpd session, its stream and aiosmtpd's objects."""
    objects: list[Any] = [SMTP, connected, Session(asyncio.get_running_loop()), Envelope(),
                          getattr(connected, "_reader", asyncio.StreamReader())]
    names = {name for obj in objects for name in dir(obj)}
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def violations(source: str, private: set[str]) -> list[str]:
    """Where `source` touches a name of `private`, overrides one, names it in a string,
    imports aiosmtpd's private names or plays with dir()/signatures."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"line {line}: .{node.attr}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                node.name in private or node.name == "__dir__"):
            found.append(f"line {line}: def {node.name}")
        elif isinstance(node, ast.Constant) and node.value in private | {"__signature__"}:
            found.append(f"line {line}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "__signature__":
            found.append(f"line {line}: .__signature__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtpd"):
            found += [f"line {line}: import {a.name}" for a in node.names
                      if a.name.startswith("_")]
    return found


async def test_the_check_catches_private_access_overrides_and_introspection_tricks(
        connected: SMTP) -> None:
    private = aiosmtpd_private_names(connected)
    assert {"_reader", "_getaddr", "_buffer", "_set_post_data_state"} <= private
    for source in ["self._reader.read()", "reader._buffer[0:0] = b''", "getattr(s, '_getaddr')",
                   "class A:\n    def _reset_timeout(self): pass",
                   "class A:\n    def __dir__(self): return []",
                   "f.__signature__ = None", "from aiosmtpd.smtp import _Missing"]:
        assert violations(source, private), source
    assert violations("self._listener.admit(self)\nself.envelope = None", private) == []


async def test_only_aiosmtpd_internals_touches_aiosmtpd_private_names(connected: SMTP) -> None:
    private = aiosmtpd_private_names(connected)
    found = {}
    for path in sorted(RELAY.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(ROOT)
        if path == INTERNALS:
            continue
        if path.parent != INTERNALS.parent:
            tree = ast.parse(source)
            imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                       and any((getattr(n, "module", None) or a.name).startswith("aiosmtpd")
                               for a in n.names)]
            if imports:
                found[str(where)] = ["imports aiosmtpd outside relay/listener"]
            continue
        if hits := violations(source, private):
            found[str(where)] = hits
    assert not found, ("aiosmtpd's private names belong in "
                       f"relay/listener/aiosmtpd_internals.py alone: {found}")


def test_the_internals_module_names_what_it_relies_on() -> None:
    assert aiosmtpd_internals.__doc__ is not None
    for name in PRIVATE_NAMES:
        assert name.split(".")[1] in INTERNALS.read_text()
