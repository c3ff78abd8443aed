"""SASL DIGEST-MD5 client: the RFC's numbers, real servers' challenge shapes, and a
full AUTH exchange over a socket against aiosmtpd running a DIGEST-MD5 server."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from relay.errors import SaslError
from relay.upstream.digest_md5 import authenticate, build_response, parse_challenge, verify_rspauth

DOVECOT = b'realm="",nonce="dZ1x9mWc3K8q",qop="auth",charset="utf-8",algorithm="md5-sess"'
CYRUS = b'nonce="Yq3TbZ0sPm4=",realm="example.test",qop="auth",charset=utf-8,algorithm=md5-sess'


def expected_digest(
    user: bytes, realm: bytes, password: bytes, nonce: str, cnonce: str, uri: str, prefix: str
) -> str:
    """RFC 2831 section 2.1.2.1, written out independently of the module."""
    a1 = hashlib.md5(user + b":" + realm + b":" + password).digest()
    ha1 = hashlib.md5(a1 + f":{nonce}:{cnonce}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{prefix}{uri}".encode()).hexdigest()
    return hashlib.md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}".encode()).hexdigest()


def test_rfc2831_worked_example_gives_the_rfcs_response_and_rspauth() -> None:
    # RFC 2831 section 4 (IMAP): user chris, password secret.
    challenge = parse_challenge(
        b'realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth",'
        b"algorithm=md5-sess,charset=utf-8"
    )
    response, rspauth = build_response(
        challenge,
        username="chris",
        password="secret",
        host="elwood.innosoft.com",
        service="imap",
        cnonce="OA6MHXh6VqTrRk",
    )
    fields = parse_challenge(response)
    assert fields["response"] == "d388dad90d4bbd760a152321f2143af7"
    assert rspauth == "ea40f60335c427b5527b84dbabcdfffd"
    assert fields["digest-uri"] == "imap/elwood.innosoft.com"
    assert fields["realm"] == "elwood.innosoft.com"
    assert (fields["nc"], fields["qop"], fields["charset"]) == ("00000001", "auth", "utf-8")
    verify_rspauth(b"rspauth=ea40f60335c427b5527b84dbabcdfffd", rspauth)


def test_smtp_vector_without_charset_matches_curl_test907() -> None:
    # curl's tests/data/test907 (SMTP, user:secret, no charset in the challenge).
    challenge = parse_challenge(
        b'realm="curl",nonce="5300d17a1d695bd411e4cdf96f9548c23ced6175",'
        b'algorithm=md5-sess,qop="auth"'
    )
    response, rspauth = build_response(
        challenge,
        username="user",
        password="secret",
        host="127.0.0.1",
        cnonce="34333231353332313633323137333231",
    )
    fields = parse_challenge(response)
    assert fields["response"] == "a27c4395f3386743be12207b7d1121c5"
    assert rspauth == "9ea859cb9d90c37ca30d49d35378630c"
    assert fields["digest-uri"] == "smtp/127.0.0.1"
    assert "charset" not in fields


def test_parses_dovecot_challenge_with_empty_realm_first() -> None:
    assert parse_challenge(DOVECOT) == {
        "realm": "",
        "nonce": "dZ1x9mWc3K8q",
        "qop": "auth",
        "charset": "utf-8",
        "algorithm": "md5-sess",
    }


def test_parses_cyrus_challenge_with_nonce_first_and_unquoted_charset() -> None:
    assert parse_challenge(CYRUS) == {
        "nonce": "Yq3TbZ0sPm4=",
        "realm": "example.test",
        "qop": "auth",
        "charset": "utf-8",
        "algorithm": "md5-sess",
    }


def test_parser_tolerates_whitespace_escapes_case_and_repeated_realm() -> None:
    data = (
        b' ,REALM = "first\\"one" ,, realm="second",\tNonce="a\\\\b" ,'
        b' qop="auth,auth-int", maxbuf=65536 ,\r\n'
    )
    assert parse_challenge(data) == {
        "realm": 'first"one',
        "nonce": "a\\b",
        "qop": "auth,auth-int",
        "maxbuf": "65536",
    }


@pytest.mark.parametrize("data", [b'nonce="unterminated', b"nonce", b'nonce="a" garbage'])
def test_parser_refuses_what_is_not_a_challenge(data: bytes) -> None:
    with pytest.raises(SaslError, match="cannot parse"):
        parse_challenge(data)


def test_response_to_dovecot_echoes_its_empty_realm_in_utf8() -> None:
    response, _ = build_response(
        parse_challenge(DOVECOT), username="notify", password="pw", host="mail.example.test"
    )
    fields = parse_challenge(response)
    assert fields["realm"] == ""
    assert fields["charset"] == "utf-8"
    assert fields["digest-uri"] == "smtp/mail.example.test"
    assert fields["nonce"] == "dZ1x9mWc3K8q"


def test_response_to_cyrus_uses_its_realm_and_smtp_service() -> None:
    response, rspauth = build_response(
        parse_challenge(CYRUS),
        username="notify@example.test",
        password="pw",
        host="127.0.0.1",
        cnonce="fixedcnonce",
    )
    fields = parse_challenge(response)
    assert fields["realm"] == "example.test"
    assert fields["digest-uri"] == "smtp/127.0.0.1"
    args = (b"notify@example.test", b"example.test", b"pw", "Yq3TbZ0sPm4=", "fixedcnonce")
    assert fields["response"] == expected_digest(*args, "smtp/127.0.0.1", "AUTHENTICATE:")
    assert rspauth == expected_digest(*args, "smtp/127.0.0.1", ":")


def test_without_any_realm_offered_the_realm_is_omitted_and_empty_in_the_hash() -> None:
    challenge = {"nonce": "n1", "qop": "auth", "charset": "utf-8", "algorithm": "md5-sess"}
    response, _ = build_response(challenge, username="u", password="p", host="h", cnonce="c")
    fields = parse_challenge(response)
    assert "realm" not in fields
    assert fields["response"] == expected_digest(
        b"u", b"", b"p", "n1", "c", "smtp/h", "AUTHENTICATE:"
    )


def test_explicit_realm_overrides_the_servers() -> None:
    response, _ = build_response(
        parse_challenge(CYRUS), username="u", password="p", host="h", realm="other.test"
    )
    assert parse_challenge(response)["realm"] == "other.test"


def test_utf8_credentials_outside_latin1_are_sent_and_hashed_as_utf8() -> None:
    user, password = "ñotify", "pass wörd €"  # € is not in ISO-8859-1
    response, _ = build_response(
        parse_challenge(DOVECOT), username=user, password=password, host="h", cnonce="c"
    )
    assert 'username="ñotify"'.encode() in response
    fields = parse_challenge(response)
    # RFC 2831 2.1.2.1: each string that fits ISO-8859-1 is hashed in ISO-8859-1.
    assert fields["response"] == expected_digest(
        user.encode("latin-1"),
        b"",
        password.encode("utf-8"),
        "dZ1x9mWc3K8q",
        "c",
        "smtp/h",
        "AUTHENTICATE:",
    )


def test_latin1_credentials_without_charset_are_sent_in_latin1() -> None:
    challenge = {"nonce": "n1", "qop": "auth", "realm": "r", "algorithm": "md5-sess"}
    response, _ = build_response(
        challenge, username="jürgen", password="pässwort", host="h", cnonce="c"
    )
    assert 'username="jürgen"'.encode("latin-1") in response
    assert b"charset" not in response
    assert parse_challenge(response)["response"] == expected_digest(
        "jürgen".encode("latin-1"),
        b"r",
        "pässwort".encode("latin-1"),
        "n1",
        "c",
        "smtp/h",
        "AUTHENTICATE:",
    )


def test_credentials_outside_latin1_without_charset_are_refused() -> None:
    with pytest.raises(SaslError, match="charset=utf-8"):
        build_response({"nonce": "n", "qop": "auth", "algorithm": "md5-sess"}, username="u",
                       password="€", host="h")


def test_challenge_without_qop_auth_is_refused_naming_what_was_offered() -> None:
    with pytest.raises(SaslError, match="auth-int,auth-conf"):
        build_response(
            {"nonce": "n", "qop": "auth-int,auth-conf"}, username="u", password="p", host="h"
        )


def test_challenge_without_nonce_is_refused() -> None:
    with pytest.raises(SaslError, match="nonce"):
        build_response({"qop": "auth"}, username="u", password="p", host="h")


@pytest.mark.parametrize("challenge", [
    b'nonce="a",nonce="b",qop="auth",algorithm=md5-sess',
    b'nonce="a",qop="auth",qop="auth-int",algorithm=md5-sess',
    b'nonce="a",qop="auth",algorithm=md5-sess,algorithm=md5-sess',
], ids=["nonce twice", "qop twice", "algorithm twice"])
def test_challenge_with_a_directive_allowed_once_given_twice_aborts(challenge: bytes) -> None:
    with pytest.raises(SaslError, match="more than once, which RFC 2831"):
        parse_challenge(challenge)


@pytest.mark.parametrize("challenge", [
    {"nonce": "n", "qop": "auth", "charset": "utf-8"},
    {"nonce": "n", "qop": "auth", "algorithm": "md5"},
], ids=["no algorithm", "algorithm md5"])
def test_challenge_without_algorithm_md5_sess_aborts(challenge: dict[str, str]) -> None:
    with pytest.raises(SaslError, match=r"RFC 2831 \(2\.1\.1\) requires algorithm=md5-sess"):
        build_response(challenge, username="u", password="p", host="h")


def test_authzid_is_sent_and_enters_a1() -> None:
    plain, _ = build_response(
        parse_challenge(CYRUS), username="u", password="p", host="h", cnonce="c"
    )
    proxied, _ = build_response(
        parse_challenge(CYRUS), username="u", password="p", host="h", cnonce="c", authzid="boss"
    )
    assert parse_challenge(proxied)["authzid"] == "boss"
    assert parse_challenge(proxied)["response"] != parse_challenge(plain)["response"]


def test_cnonce_is_random_when_not_given() -> None:
    first, _ = build_response(parse_challenge(CYRUS), username="u", password="p", host="h")
    second, _ = build_response(parse_challenge(CYRUS), username="u", password="p", host="h")
    assert parse_challenge(first)["cnonce"] != parse_challenge(second)["cnonce"]


def test_wrong_or_missing_rspauth_is_refused() -> None:
    with pytest.raises(SaslError, match="rspauth did not match"):
        verify_rspauth(
            b"rspauth=00000000000000000000000000000000", "ea40f60335c427b5527b84dbabcdfffd"
        )
    with pytest.raises(SaslError, match="rspauth did not match"):
        verify_rspauth(b"", "ea40f60335c427b5527b84dbabcdfffd")


# --- end to end: aiosmtpd with a DIGEST-MD5 server mechanism, over a real socket ---


class DigestServer:
    """The server side of RFC 2831, as an aiosmtpd handler mechanism."""

    def __init__(
        self, users: dict[str, str], *, corrupt_rspauth: bool = False, skip_rspauth: bool = False
    ) -> None:
        self.users = users
        self.corrupt_rspauth = corrupt_rspauth
        self.skip_rspauth = skip_rspauth
        self.realm = "example.test"
        self.cancelled = False
        self.authenticated: list[str] = []

    async def auth_DIGEST__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        nonce = secrets.token_urlsafe(12)
        blob = await server.challenge_auth(
            f'nonce="{nonce}",realm="{self.realm}",qop="auth",charset=utf-8,algorithm=md5-sess'
        )
        if blob is MISSING:
            self.cancelled = True
            return AuthResult(success=False, handled=True)
        fields = parse_challenge(blob)
        user, uri = fields["username"], fields["digest-uri"]
        if user not in self.users or fields["nonce"] != nonce or not uri.startswith("smtp/"):
            return AuthResult(success=False, handled=False)
        args_ = (
            user.encode(),
            fields.get("realm", "").encode(),
            self.users[user].encode(),
            nonce,
            fields["cnonce"],
        )
        if fields["response"] != expected_digest(*args_, uri, "AUTHENTICATE:"):
            return AuthResult(success=False, handled=False)
        rspauth = expected_digest(*args_, uri, ":")
        if self.corrupt_rspauth:
            rspauth = "0" * 32
        if self.skip_rspauth:  # accepts at once, proving nothing
            self.authenticated.append(user)
            return AuthResult(success=True, auth_data=user)
        if await server.challenge_auth(f"rspauth={rspauth}") is MISSING:
            self.cancelled = True
            return AuthResult(success=False, handled=True)
        self.authenticated.append(user)
        return AuthResult(success=True, auth_data=user)


@asynccontextmanager
async def serve(handler: Any) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="localhost", auth_require_tls=False, loop=loop),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def connected_client(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
    await client.connect()
    await client.ehlo()
    assert "digest-md5" in client.server_auth_methods
    return client


@pytest.fixture
async def good_server() -> AsyncIterator[tuple[int, DigestServer]]:
    handler = DigestServer({"notify@example.test": "s3cret pass"})
    async with serve(handler) as port:
        yield port, handler


async def test_authenticates_over_smtp_against_a_digest_md5_server(
    good_server: tuple[int, DigestServer],
) -> None:
    port, handler = good_server
    client = await connected_client(port)
    try:
        reply = await authenticate(client, "notify@example.test", "s3cret pass", host="127.0.0.1")
        assert reply.code == 235
        assert handler.authenticated == ["notify@example.test"]
        assert (await client.noop()).code == 250
    finally:
        await client.quit()


async def test_wrong_password_raises_smtp_authentication_error(
    good_server: tuple[int, DigestServer],
) -> None:
    port, handler = good_server
    client = await connected_client(port)
    try:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await authenticate(client, "notify@example.test", "wrong", host="127.0.0.1")
        assert info.value.code == 535
        assert handler.authenticated == []
    finally:
        await client.quit()


async def test_wrong_rspauth_cancels_the_exchange_and_raises_sasl_error() -> None:
    handler = DigestServer({"notify@example.test": "pw"}, corrupt_rspauth=True)
    async with serve(handler) as port:
        client = await connected_client(port)
        try:
            with pytest.raises(SaslError, match="rspauth did not match"):
                await authenticate(client, "notify@example.test", "pw", host="127.0.0.1")
            assert handler.cancelled
            assert handler.authenticated == []
            assert (await client.noop()).code == 250  # the session is still in step
        finally:
            await client.quit()


async def test_server_accepting_without_rspauth_is_not_trusted() -> None:
    handler = DigestServer({"u": "p"}, skip_rspauth=True)
    async with serve(handler) as port:
        client = await connected_client(port)
        try:
            with pytest.raises(SaslError, match="without sending rspauth"):
                await authenticate(client, "u", "p", host="127.0.0.1")
        finally:
            await client.quit()


async def test_server_without_digest_md5_gives_smtp_authentication_error() -> None:
    async with serve(object()) as port:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
        await client.connect()
        try:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
                await authenticate(client, "u", "p", host="127.0.0.1")
            assert info.value.code == 504
        finally:
            await client.quit()
