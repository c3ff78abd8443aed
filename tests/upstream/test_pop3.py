"""The asyncio POP3 client over real sockets, against a small POP3 server in this file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from relay.errors import Pop3Error, Pop3Timeout, TemporaryFailure
from relay.settings import ServerSettings
from relay.upstream.pop3 import Pop3Client
from relay.upstream.pop_before_smtp import pop_before_smtp, pop_login

TIMESTAMP = "<1896.697170952@dbc.mtview.ca.us>"


@dataclass
class Pop3Stub:
    """Just enough of a POP3 server; records every line it receives."""

    greeting: bytes = f"+OK POP3 stub ready {TIMESTAMP}\r\n".encode()
    capabilities: list[str] = field(default_factory=lambda: ["TOP", "USER", "..DOTTED"])
    users: dict[str, str] = field(default_factory=lambda: {"notify": "secret"})
    capa_supported: bool = True
    tls: ssl.SSLContext | None = None
    """Server context for STLS; STLS is offered when set."""
    after_stls: bytes = b""
    """Bytes sent right after +OK to STLS, before the handshake (an injection)."""
    hang_on: str | None = None
    """Command (or "greeting") the server never answers."""
    close_on: str | None = None
    """Command at which the server drops the connection without a word."""
    received: list[bytes] = field(default_factory=list)
    tls_active_at: dict[str, bool] = field(default_factory=dict)
    apop_ok: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._dialogue(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            # After a failed server-side start_tls, wait_closed() never returns.
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.hang_on == "greeting":
            await reader.read()
            return
        writer.write(self.greeting)
        user: str | None = None
        while line := await reader.readline():
            self.received.append(line)
            command, _, arg = line.decode("utf-8").rstrip("\r\n").partition(" ")
            command = command.upper()
            self.tls_active_at[command] = writer.get_extra_info("ssl_object") is not None
            if command == self.hang_on:
                await reader.read()
                return
            if command == self.close_on:
                return
            if command == "CAPA" and self.capa_supported:
                caps = [*self.capabilities, *(["STLS"] if self.tls else [])]
                writer.write(b"+OK\r\n" + b"".join(c.encode() + b"\r\n" for c in caps) + b".\r\n")
            elif command == "STLS" and self.tls is not None:
                writer.write(b"+OK Begin TLS negotiation\r\n" + self.after_stls)
                await writer.drain()
                await writer.start_tls(self.tls)
            elif command == "USER":
                user = arg
                writer.write(b"+OK\r\n")
            elif command == "PASS" and user is not None:
                if self.users.get(user) == arg:
                    writer.write(b"+OK Logged in.\r\n")
                else:
                    writer.write(b"-ERR [AUTH] Authentication failed.\r\n")
            elif command == "APOP":
                name, _, digest = arg.rpartition(" ")
                password = self.users.get(name, "")
                good = hashlib.md5((TIMESTAMP + password).encode()).hexdigest()
                self.apop_ok = name in self.users and digest == good
                writer.write(b"+OK Logged in.\r\n" if self.apop_ok else b"-ERR [AUTH] bad\r\n")
            elif command == "QUIT":
                writer.write(b"+OK Logging out.\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"-ERR Unknown command.\r\n")
            await writer.drain()

    def sent(self) -> bytes:
        return b"".join(self.received)


@asynccontextmanager
async def running(stub: Pop3Stub, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(stub.handle, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Certs:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def certs() -> Certs:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certs(server, client)


async def login(port: int, **kwargs: object) -> str:
    options: dict[str, object] = {
        "encryption": "none",
        "ssl_context": None,
        "timeout": 5,
        "username": "notify",
        "password": "secret",
        "apop": False,
    }
    options.update(kwargs)
    return await pop_login("127.0.0.1", port, **options)  # type: ignore[arg-type]


async def test_user_pass_login_reports_each_step_without_the_password() -> None:
    stub = Pop3Stub()
    steps: list[tuple[str, float, str]] = []
    async with running(stub) as port:
        text = await login(port, on_step=lambda *step: steps.append(step))
    assert text == "Logged in."
    assert [name for name, _, _ in steps] == ["connect", "greeting", "USER", "PASS", "QUIT"]
    assert all(seconds >= 0 for _, seconds, _ in steps)
    assert TIMESTAMP in steps[1][2]
    assert not any("secret" in answer for _, _, answer in steps)
    assert stub.received == [b"USER notify\r\n", b"PASS secret\r\n", b"QUIT\r\n"]


async def test_apop_sends_md5_of_timestamp_and_password_never_the_password() -> None:
    stub = Pop3Stub()
    async with running(stub) as port:
        assert await login(port, apop=True) == "Logged in."
    assert stub.apop_ok
    assert b"secret" not in stub.sent()
    assert b"PASS" not in stub.sent()


async def test_apop_without_greeting_timestamp_refuses_and_sends_no_password() -> None:
    stub = Pop3Stub(greeting=b"+OK POP3 ready\r\n")
    async with running(stub) as port:
        with pytest.raises(Pop3Error, match="no APOP timestamp; set apop = false") as info:
            await login(port, apop=True)
    assert info.value.stage == "APOP"
    assert b"secret" not in stub.sent()
    assert not any(line.startswith((b"USER", b"PASS", b"APOP")) for line in stub.received)


async def test_wrong_password_raises_with_the_servers_text_and_the_step() -> None:
    async with running(Pop3Stub()) as port:
        with pytest.raises(Pop3Error) as info:
            await login(port, password="wrong")
    assert info.value.stage == "PASS"
    assert "refused PASS: -ERR [AUTH] Authentication failed." in str(info.value)
    assert "pop_before_smtp.username" in str(info.value)
    assert not isinstance(info.value, Pop3Timeout)


async def test_wrong_apop_digest_raises_naming_apop() -> None:
    async with running(Pop3Stub()) as port:
        with pytest.raises(Pop3Error, match="refused APOP: -ERR") as info:
            await login(port, apop=True, password="wrong")
    assert info.value.stage == "APOP"


async def test_silent_server_times_out_waiting_for_the_greeting() -> None:
    async with running(Pop3Stub(hang_on="greeting")) as port:
        with pytest.raises(
            Pop3Timeout, match=r"timeout after 0\.3 s waiting for the greeting"
        ) as info:
            await login(port, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert info.value.stage == "greeting"


async def test_server_that_never_answers_pass_times_out_naming_pass() -> None:
    async with running(Pop3Stub(hang_on="PASS")) as port:
        with pytest.raises(
            Pop3Timeout, match=r"timeout after 0\.3 s waiting for the reply to PASS"
        ):
            await login(port, timeout=0.3)


async def test_server_dropping_the_connection_is_a_pop3_error_naming_the_step() -> None:
    async with running(Pop3Stub(close_on="PASS")) as port:
        with pytest.raises(Pop3Error, match="closed the connection during PASS") as info:
            await login(port)
    assert info.value.stage == "PASS"


async def test_capa_reads_multiline_answer_and_unstuffs_dots() -> None:
    async with running(Pop3Stub()) as port:
        client = await Pop3Client.connect(
            "127.0.0.1", port, encryption="none", ssl_context=None, timeout=5
        )
        async with client:
            assert await client.capa() == ["TOP", "USER", ".DOTTED"]
            assert client.apop_timestamp == TIMESTAMP
            assert client.greeting.startswith("POP3 stub ready")


async def test_capa_on_a_server_without_it_raises() -> None:
    async with running(Pop3Stub(capa_supported=False)) as port:
        client = await Pop3Client.connect(
            "127.0.0.1", port, encryption="none", ssl_context=None, timeout=5
        )
        async with client:
            with pytest.raises(Pop3Error, match="does not support CAPA"):
                await client.capa()


async def test_starttls_logs_in_over_tls_after_stls(certs: Certs) -> None:
    stub = Pop3Stub(tls=certs.server)
    steps: list[str] = []
    async with running(stub) as port:
        text = await login(
            port,
            encryption="starttls",
            ssl_context=certs.client,
            on_step=lambda name, *_: steps.append(name),
        )
    assert text == "Logged in."
    assert steps == ["connect", "greeting", "CAPA", "STLS", "TLS handshake", "USER", "PASS", "QUIT"]
    assert stub.tls_active_at == {
        "CAPA": False,
        "STLS": False,
        "USER": True,
        "PASS": True,
        "QUIT": True,
    }


@pytest.mark.parametrize("capa_supported", [True, False])
async def test_starttls_is_refused_clearly_when_stls_is_not_offered(capa_supported: bool) -> None:
    stub = Pop3Stub(capa_supported=capa_supported)
    async with running(stub) as port:
        with pytest.raises(
            Pop3Error, match='does not offer STLS; set encryption = "none" or "tls"'
        ):
            await login(port, encryption="starttls")
    assert b"secret" not in stub.sent()
    assert b"USER" not in stub.sent()


async def test_data_injected_after_stls_answer_is_refused(certs: Certs) -> None:
    stub = Pop3Stub(tls=certs.server, after_stls=b"+OK injected\r\n")
    async with running(stub) as port:
        with pytest.raises(Pop3Error, match="sent data before the TLS handshake"):
            await login(port, encryption="starttls", ssl_context=certs.client)
    assert b"USER" not in stub.sent()


async def test_pop3s_wraps_the_connection_in_tls_from_the_start(certs: Certs) -> None:
    stub = Pop3Stub()
    steps: list[tuple[str, str]] = []
    async with running(stub, certs.server) as port:
        text = await login(
            port,
            encryption="tls",
            ssl_context=certs.client,
            apop=True,
            on_step=lambda name, _, answer: steps.append((name, answer)),
        )
    assert text == "Logged in."
    assert [name for name, _ in steps][:3] == ["connect", "TLS handshake", "greeting"]
    assert steps[1][1].startswith("TLSv1")
    assert stub.tls_active_at["APOP"]


async def test_untrusted_certificate_fails_verification(certs: Certs) -> None:
    stranger = ssl.create_default_context()  # does not trust the test CA
    stub = Pop3Stub()
    async with running(stub, certs.server) as port:
        with pytest.raises(Pop3Error, match="failed certificate verification") as info:
            await login(port, encryption="tls", ssl_context=stranger)
    assert info.value.stage == "TLS handshake"
    assert stub.received == []


async def test_connection_refused_is_a_clear_pop3_error() -> None:
    async with running(Pop3Stub()) as port:
        pass  # the port is closed again: nothing listens there now
    with pytest.raises(Pop3Error, match="refused the connection") as info:
        await login(port)
    assert info.value.stage == "connect"


async def test_overlong_line_is_refused_without_reading_it_all() -> None:
    stub = Pop3Stub(greeting=b"+OK " + b"x" * 100_000 + b"\r\n")
    async with running(stub) as port:
        with pytest.raises(Pop3Error, match="line longer than 8192 bytes"):
            await login(port)


async def test_capa_answer_over_64_kib_is_refused_though_under_1000_lines() -> None:
    stub = Pop3Stub(capabilities=[f"X-{i} " + "y" * 8000 for i in range(500)])  # 4 MB
    async with running(stub) as port:
        client = await Pop3Client.connect(
            "127.0.0.1", port, encryption="none", ssl_context=None, timeout=5
        )
        async with client:
            with pytest.raises(Pop3Error, match="longer than 1000 lines or 65536 bytes"):
                await client.capa()


async def test_non_ascii_password_is_sent_as_utf8() -> None:
    stub = Pop3Stub(users={"notify": "pässwörd €"})
    async with running(stub) as port:
        assert await login(port, password="pässwörd €") == "Logged in."
    assert "PASS pässwörd €\r\n".encode() in stub.received


async def test_non_ascii_password_works_with_apop() -> None:
    stub = Pop3Stub(users={"notify": "pässwörd €"})
    async with running(stub) as port:
        assert await login(port, password="pässwörd €", apop=True) == "Logged in."
    assert stub.apop_ok


async def test_line_break_in_credentials_is_refused_before_sending() -> None:
    stub = Pop3Stub()
    async with running(stub) as port:
        with pytest.raises(Pop3Error, match="line break"):
            await login(port, password="secret\r\nDELE 1")
    assert b"DELE" not in stub.sent()


async def test_context_manager_sends_quit_and_closes() -> None:
    stub = Pop3Stub()
    async with running(stub) as port:
        client = await Pop3Client.connect(
            "127.0.0.1", port, encryption="none", ssl_context=None, timeout=5
        )
        async with client:
            assert await client.login("notify", "secret", apop=False) == "Logged in."
        with pytest.raises(Pop3Error, match="closed"):
            await client.capa()
    assert stub.received[-1] == b"QUIT\r\n"


async def test_pop_before_smtp_trusts_the_ca_file_of_its_own_section(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "pop-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running(Pop3Stub(), server_tls) as port:
        server = ServerSettings.model_validate({
            "host": "smtp.example.com", "port": 587, "encryption": "starttls",
            "pop_before_smtp": {"host": "127.0.0.1", "port": port, "encryption": "tls",
                                "ca_file": str(ca_file), "username": "notify",
                                "password": "secret", "timeout": 5}})
        assert await pop_before_smtp("mail", server) == "Logged in."
        untrusted = server.model_copy(update={"pop_before_smtp": server.pop_before_smtp
                                              .model_copy(update={"ca_file": None})})
        with pytest.raises(TemporaryFailure, match="failed certificate verification"):
            await pop_before_smtp("mail", untrusted)


async def test_pop_before_smtp_without_its_own_ca_file_trusts_the_servers(
        tmp_path: Path) -> None:
    """docs/configuration.md: pop_before_smtp.ca_file not set, servers.NAME.ca_file is used."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "corp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running(Pop3Stub(), server_tls) as port:
        pop = {"host": "127.0.0.1", "port": port, "encryption": "tls", "username": "notify",
               "password": "secret", "timeout": 5}
        server = ServerSettings.model_validate({
            "host": "smtp.example.com", "port": 587, "encryption": "starttls",
            "ca_file": str(ca_file), "pop_before_smtp": pop})
        assert await pop_before_smtp("mail", server) == "Logged in."
        without = server.model_copy(update={"ca_file": None})
        with pytest.raises(TemporaryFailure, match="failed certificate verification"):
            await pop_before_smtp("mail", without)
