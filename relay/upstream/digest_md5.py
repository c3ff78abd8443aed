"""SASL DIGEST-MD5 (RFC 2831) on the client side, for SMTP AUTH through aiosmtplib.

aiosmtplib speaks PLAIN, LOGIN, CRAM-MD5 and XOAUTH2; this module adds DIGEST-MD5
over its public `execute_command`, so a failure looks exactly like one of
aiosmtplib's own mechanisms (`SMTPAuthenticationError`). Only qop=auth is
offered: no integrity or confidentiality layer, the session's TLS does that.

The three pure functions work on decoded SASL payloads (no base64, no SMTP), so
they can be driven by any transport or fixture:

    challenge = parse_challenge(server_payload)
    response, rspauth = build_response(challenge, username=..., password=..., host=...)
    verify_rspauth(second_server_payload, rspauth)

Choices RFC 2831 leaves to the client, as made here:

- realm: the `realm` argument when given, else the first realm the server
  offered (Dovecot offers `realm=""`, which is sent back as is), else no realm
  directive at all, and the empty string in A1 (RFC 2831 section 2.1.2,
  "realm": "If the directive is missing, realm-value will set to the empty
  string"). The host part of the username is not guessed: a Cyrus account in
  realm R is logged in to as user@R, and the server offers R.
- charset: when the server offers `charset=utf-8`, the response says so and
  carries UTF-8. For the hash, each of username, realm and password is converted
  to ISO-8859-1 when all its characters fit (section 2.1.2.1; each string on its
  own, as Cyrus SASL does), else hashed as UTF-8. Dovecot does not fold: it
  hashes the UTF-8 bytes. So when folding changed a credential and the server
  refuses, `authenticate` tries once more without folding. Without `charset`,
  everything is ISO-8859-1, and a credential that does not fit is refused.
- digest-uri: `smtp/<host>`, host being the server's name as configured.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import re
import secrets

import aiosmtplib

from relay.errors import SaslError

__all__ = ["authenticate", "build_response", "parse_challenge", "verify_rspauth"]

# key = value, value a quoted-string (with backslash escapes) or a token; elements
# separated by commas, with optional whitespace and empty elements (the #rule).
_PAIR = re.compile(
    r"[\s,]*(?P<key>[A-Za-z0-9_-]+)\s*=\s*"
    r'(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>[^",\s]*))\s*(?:,|$)',
    re.DOTALL,
)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_NC = "00000001"
_ONCE = frozenset({"nonce", "qop", "algorithm", "charset", "maxbuf", "stale"})


def parse_challenge(data: bytes) -> dict[str, str]:
    """Parse a digest-challenge (or the server's `rspauth=...` final payload).

    Keys are lower-cased; quoted values are unquoted and unescaped. A directive
    given twice (realm, typically) keeps its first value, but one that RFC 2831
    2.1.1 allows only once (nonce, qop, algorithm, charset, maxbuf, stale) aborts:
    the client cannot know which one the server means. Raises SaslError then, and
    when the text is not a list of key=value pairs.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("iso-8859-1")
    result: dict[str, str] = {}
    pos = 0
    while text[pos:].strip(" \t\r\n,"):
        match = _PAIR.match(text, pos)
        if match is None or match.end() == pos:
            raise SaslError(f"cannot parse the server's DIGEST-MD5 challenge near {text[pos:]!r}")
        quoted = match.group("quoted")
        value = _UNESCAPE.sub(r"\1", quoted) if quoted is not None else match.group("token")
        key = match.group("key").lower()
        if key in result and key in _ONCE:
            raise SaslError(
                f"the server's DIGEST-MD5 challenge has {key} more than once, which RFC 2831 "
                "(2.1.1) forbids: authentication aborted; fix the server, or use another "
                "mechanism (auth.method)")
        result.setdefault(key, value)
        pos = match.end()
    return result


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hash_bytes(value: str, utf8: bool, fold: bool = True) -> bytes:
    """The octets RFC 2831 hashes for a username, realm or password."""
    if utf8 and not fold:
        return value.encode("utf-8")
    try:
        return value.encode("iso-8859-1")
    except UnicodeEncodeError:
        if utf8:
            return value.encode("utf-8")
        raise SaslError(
            "the server did not offer charset=utf-8, and the username, realm or password "
            "has characters outside ISO-8859-1; use another mechanism or change the password"
        ) from None


def _hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def build_response(
    challenge: dict[str, str],
    *,
    username: str,
    password: str,
    host: str,
    service: str = "smtp",
    authzid: str | None = None,
    cnonce: str | None = None,
    realm: str | None = None,
    fold: bool = True,
) -> tuple[bytes, str]:
    """Return the digest-response to send (not base64-encoded) and the rspauth to expect.

    `fold=False` hashes UTF-8 credentials as UTF-8 even where ISO-8859-1 would do
    (what Dovecot expects).
    """
    qops = [q.strip().lower() for q in challenge.get("qop", "auth").split(",")]
    if "auth" not in qops:
        raise SaslError(
            f"the server's DIGEST-MD5 challenge offers qop={challenge.get('qop')!r}; this client "
            "supports only qop=auth (no security layer); use another mechanism"
        )
    nonce = challenge.get("nonce")
    if not nonce:
        raise SaslError("the server's DIGEST-MD5 challenge has no nonce")
    algorithm = challenge.get("algorithm")
    if algorithm is None or algorithm.lower() != "md5-sess":
        asked = "has no algorithm" if algorithm is None else f"asks for algorithm={algorithm!r}"
        raise SaslError(
            f"the server's DIGEST-MD5 challenge {asked}; RFC 2831 (2.1.1) requires "
            "algorithm=md5-sess: authentication aborted; fix the server, or use another "
            "mechanism (auth.method)")
    utf8 = challenge.get("charset", "").lower() == "utf-8"
    if realm is None:
        realm = challenge.get("realm")
    cnonce = cnonce or secrets.token_urlsafe(24)
    digest_uri = f"{service}/{host}"

    secret = hashlib.md5(
        b":".join(_hash_bytes(v, utf8, fold) for v in (username, realm or "", password))
    ).digest()
    a1 = secret + f":{nonce}:{cnonce}".encode()
    if authzid:
        a1 += b":" + authzid.encode("utf-8")
    ha1 = _hex(a1)

    def kd(a2: str) -> str:
        return _hex(f"{ha1}:{nonce}:{_NC}:{cnonce}:auth:{_hex(a2.encode())}".encode())

    fields = ["charset=utf-8"] if utf8 else []
    fields.append(f"username={_quote(username)}")
    if realm is not None:
        fields.append(f"realm={_quote(realm)}")
    fields += [
        f"nonce={_quote(nonce)}",
        f"cnonce={_quote(cnonce)}",
        f"nc={_NC}",
        "qop=auth",
        f"digest-uri={_quote(digest_uri)}",
        f"response={kd('AUTHENTICATE:' + digest_uri)}",
    ]
    if authzid:
        fields.append(f"authzid={_quote(authzid)}")
    text = ",".join(fields)
    try:
        response = text.encode("utf-8" if utf8 else "iso-8859-1")
    except UnicodeEncodeError:
        raise SaslError(
            "the server did not offer charset=utf-8, and the username or authzid has "
            "characters outside ISO-8859-1"
        ) from None
    return response, kd(":" + digest_uri)


def verify_rspauth(data: bytes, expected: str) -> None:
    """Check the server's proof that it knows the password; raise SaslError if it fails."""
    rspauth = parse_challenge(data).get("rspauth", "")
    if not hmac.compare_digest(rspauth.lower().encode(), expected.encode()):
        raise SaslError(
            "the server's rspauth did not match: it does not know the password, "
            "or something altered the exchange"
        )


def _decode_payload(message: str) -> bytes:
    try:
        return base64.b64decode(message.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslError(f"the server's DIGEST-MD5 payload is not base64: {message!r}") from None


async def _cancel(client: aiosmtplib.SMTP) -> None:
    """Abort the exchange with '*' (RFC 4954) so the session stays usable or closes cleanly."""
    with contextlib.suppress(aiosmtplib.SMTPException):
        await client.execute_command(b"*")


def _folding_matters(username: str, password: str) -> bool:
    """True when RFC 2831's ISO-8859-1 folding changes the bytes of a credential."""
    def folds(value: str) -> bool:
        try:
            return not value.isascii() and bool(value.encode("iso-8859-1"))
        except UnicodeEncodeError:
            return False

    return folds(username) or folds(password)


async def authenticate(
    client: aiosmtplib.SMTP, username: str, password: str, *, host: str
) -> aiosmtplib.SMTPResponse:
    """Log in with AUTH DIGEST-MD5; see `_exchange`. With non-ASCII credentials that
    ISO-8859-1 can hold, a refused RFC 2831 login is tried once more as Dovecot hashes."""
    try:
        return await _exchange(client, username, password, host=host, fold=True)
    except aiosmtplib.SMTPAuthenticationError as refused:
        if refused.code != 535 or not _folding_matters(username, password):
            raise
        return await _exchange(client, username, password, host=host, fold=False)


async def _exchange(
    client: aiosmtplib.SMTP, username: str, password: str, *, host: str, fold: bool
) -> aiosmtplib.SMTPResponse:
    """Log in with AUTH DIGEST-MD5 on a connected client (after STARTTLS, if any).

    A refusal by the server raises `aiosmtplib.SMTPAuthenticationError`, as
    aiosmtplib's own mechanisms do; a problem on our side of the exchange (a
    challenge we cannot answer, a wrong or missing rspauth) cancels the exchange
    and raises SaslError.
    """
    if client.is_ehlo_or_helo_needed:
        await client.ehlo()
    reply = await client.execute_command(b"AUTH", b"DIGEST-MD5")
    if reply.code != 334:
        raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
    try:
        challenge = parse_challenge(_decode_payload(reply.message))
        response, expected = build_response(
            challenge, username=username, password=password, host=host, fold=fold
        )
    except SaslError:
        await _cancel(client)
        raise

    reply = await client.execute_command(base64.b64encode(response))
    if reply.code != 334:
        if 200 <= reply.code < 300:
            # Accepted without proving that it knows the password (RFC 4954 has
            # no room for rspauth in a 235): treat it as the wrong rspauth it is.
            raise SaslError(
                "the server accepted DIGEST-MD5 without sending rspauth, so it has not shown "
                "that it knows the password; not trusting this session"
            )
        raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
    try:
        verify_rspauth(_decode_payload(reply.message), expected)
    except SaslError:
        await _cancel(client)
        raise

    reply = await client.execute_command(b"")
    if reply.code != 235:
        if reply.code == 334:
            await _cancel(client)
        raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
    return reply
