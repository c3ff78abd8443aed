"""Reference SASL client steps (RFC 4616 PLAIN, LOGIN, RFC 2195 CRAM-MD5, RFC 2831
DIGEST-MD5) over smtplib, UTF-8 throughout, for the peers' self-tests.

smtplib's own ``login()`` encodes credentials as ASCII, so it cannot log in the
UTF-8 user; :func:`smtp_auth` can.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import smtplib

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _cmd(smtp: smtplib.SMTP, line: str) -> tuple[int, bytes]:
    smtp.putcmd(line)
    return smtp.getreply()


def parse_digest_challenge(challenge: bytes) -> dict[str, str]:
    """Parse ``key=value`` / ``key="quoted"`` pairs (RFC 2831 section 2.1.1)."""
    pairs = re.findall(rb'([A-Za-z-]+)=(?:"((?:[^"\\]|\\.)*)"|([^,]*))', challenge)
    return {
        k.decode().lower(): (q.replace(b"\\", b"") if q else t).decode("utf-8") for k, q, t in pairs
    }


def digest_md5_response(
    challenge: dict[str, str],
    username: str,
    password: str,
    host: str = "localhost",
    service: str = "smtp",
    realm: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The client's digest-response (no Latin-1 folding: UTF-8 bytes as they are)."""
    realm = challenge.get("realm", "") if realm is None else realm
    nonce = challenge["nonce"]
    cnonce = cnonce or secrets.token_hex(16)
    uri = f"{service}/{host}"
    nc, qop = "00000001", "auth"
    a1 = (
        hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()
        + f":{nonce}:{cnonce}".encode()
    )
    ha1 = hashlib.md5(a1).hexdigest()
    ha2 = hashlib.md5(f"AUTHENTICATE:{uri}".encode()).hexdigest()
    response = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode()).hexdigest()
    fields = [
        f'username="{_quote(username)}"',
        f'realm="{_quote(realm)}"',
        f'nonce="{_quote(nonce)}"',
        f'cnonce="{cnonce}"',
        f"nc={nc}",
        f"qop={qop}",
        f'digest-uri="{uri}"',
        f"response={response}",
        "charset=utf-8",
    ]
    return ",".join(fields)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def smtp_auth(
    smtp: smtplib.SMTP, mechanism: str, username: str, password: str, realm: str | None = None
) -> tuple[int, bytes]:
    """Run one AUTH exchange; return the final reply (235 on success). Never raises on 535."""
    user, pw = username.encode(), password.encode()
    mech = mechanism.upper()
    if mech == "PLAIN":
        initial = _b64(b"\0" + user + b"\0" + pw)
        return _cmd(smtp, f"AUTH PLAIN {initial}")
    if mech == "LOGIN":
        code, _ = _cmd(smtp, "AUTH LOGIN")
        if code != 334:
            return code, _
        code, _ = _cmd(smtp, _b64(user))
        if code != 334:
            return code, _
        return _cmd(smtp, _b64(pw))
    if mech == "CRAM-MD5":
        code, text = _cmd(smtp, "AUTH CRAM-MD5")
        if code != 334:
            return code, text
        digest = hmac.new(pw, base64.b64decode(text), hashlib.md5).hexdigest()
        return _cmd(smtp, _b64(user + b" " + digest.encode()))
    if mech == "DIGEST-MD5":
        code, text = _cmd(smtp, "AUTH DIGEST-MD5")
        if code != 334:
            return code, text
        challenge = parse_digest_challenge(base64.b64decode(text))
        code, text = _cmd(
            smtp, _b64(digest_md5_response(challenge, username, password, realm=realm).encode())
        )
        if code != 334:
            return code, text
        if not base64.b64decode(text).startswith(b"rspauth="):
            return code, text
        return _cmd(smtp, "")
    raise ValueError(f"unsupported mechanism {mechanism}")
