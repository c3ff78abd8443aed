"""The Postfix SMTP listeners: one master.cf inet service per test case.

Every listener shares main.cf's failure injection (RCPT: ``tempfail-*`` 450,
``reject-*`` 550; after the final dot: ``data451-*`` 451, ``data554-*`` 554),
``smtpd_sasl_authenticated_header`` and ``smtpd_tls_received_header``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.peers.certs import CertPair, PeerPKI

POLICY_SERVICE = "pbspolicy"  # master.cf name of the POP-before-SMTP policy (spawn)

LISTENER_NAMES = (
    "plain",
    "dovecot_auth",
    "cyrus_auth",
    "starttls_auth",
    "tls_auth",
    "starttls_untrusted",
    "starttls_wrongname",
    "pop_before_smtp",
    "plain_no_pipelining",
)


@dataclass(frozen=True)
class Listener:
    name: str
    description: str
    options: dict[str, str] = field(default_factory=dict)


def _tls(level: str, cert: CertPair) -> dict[str, str]:
    return {
        "smtpd_tls_security_level": level,
        "smtpd_tls_cert_file": str(cert.cert_file),
        "smtpd_tls_key_file": str(cert.key_file),
    }


def _restrict(*extra: str) -> dict[str, str]:
    # Failure injection first, so it also works on listeners that need auth.
    return {"smtpd_recipient_restrictions": ",".join(["$peer_fail_injection", *extra])}


def _sasl(kind: str, tls_only: bool) -> dict[str, str]:
    return {
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": kind,
        "smtpd_sasl_path": "$peer_dovecot_auth_path" if kind == "dovecot" else "smtpd",
        "smtpd_tls_auth_only": "yes" if tls_only else "no",
    }


def listeners(pki: PeerPKI) -> list[Listener]:
    """All listener definitions, in master.cf order."""
    need_auth = _restrict("permit_sasl_authenticated", "reject")
    defined = [
        Listener(
            "plain",
            "no TLS, no AUTH, any recipient",
            {
                "smtpd_tls_security_level": "none",
                "smtpd_sasl_auth_enable": "no",
                **_restrict("permit"),
            },
        ),
        Listener(
            "dovecot_auth",
            "AUTH via Dovecot (PLAIN LOGIN CRAM-MD5 DIGEST-MD5) "
            "allowed without TLS; STARTTLS offered; RCPT needs AUTH",
            {
                **_tls("may", pki.server),
                **_sasl("dovecot", tls_only=False),
                **need_auth,
            },
        ),
        Listener(
            "cyrus_auth",
            "AUTH via Cyrus SASL sasldb2, allowed without TLS; STARTTLS offered; RCPT needs AUTH",
            {
                **_tls("may", pki.server),
                **_sasl("cyrus", tls_only=False),
                **need_auth,
            },
        ),
        Listener(
            "starttls_auth",
            "STARTTLS required, AUTH (Dovecot) only after it; RCPT needs AUTH",
            {
                **_tls("encrypt", pki.server),
                **_sasl("dovecot", tls_only=True),
                **need_auth,
            },
        ),
        Listener(
            "tls_auth",
            "implicit TLS (wrapper mode), AUTH via Dovecot; RCPT needs AUTH",
            {
                **_tls("encrypt", pki.server),
                "smtpd_tls_wrappermode": "yes",
                **_sasl("dovecot", tls_only=False),
                **need_auth,
            },
        ),
        Listener(
            "starttls_untrusted",
            "STARTTLS offered with a cert from an untrusted CA; "
            "AUTH (Dovecot) after STARTTLS, optional",
            {
                **_tls("may", pki.untrusted),
                **_sasl("dovecot", tls_only=True),
                **_restrict("permit"),
            },
        ),
        Listener(
            "starttls_wrongname",
            "STARTTLS offered with a trusted cert for "
            "wrong.example; AUTH (Dovecot) after STARTTLS, optional",
            {
                **_tls("may", pki.wrong_name),
                **_sasl("dovecot", tls_only=True),
                **_restrict("permit"),
            },
        ),
        Listener(
            "pop_before_smtp",
            "no AUTH; RCPT only after a recent POP3 login "
            "from the client IP (Dovecot post-login record + policy); STARTTLS offered",
            {
                **_tls("may", pki.server),
                "smtpd_sasl_auth_enable": "no",
                **_restrict(f"check_policy_service unix:private/{POLICY_SERVICE}", "reject"),
            },
        ),
        Listener(
            "plain_no_pipelining",
            "as plain, but PIPELINING is not offered (Postfix would still take pipelined "
            "MAIL and RCPT without a word: the tests watch the wire)",
            {
                "smtpd_tls_security_level": "none",
                "smtpd_sasl_auth_enable": "no",
                "smtpd_discard_ehlo_keywords": "pipelining",
                **_restrict("permit"),
            },
        ),
    ]
    assert tuple(lsn.name for lsn in defined) == LISTENER_NAMES
    return defined


OAUTH_LISTENER = "oauth"
"""Kept out of LISTENER_NAMES: it takes bearer tokens only, which the password self-tests
have none of."""
OAUTH_IDLE_TIMEOUT = 3
"""Seconds the OAuth listener keeps a silent connection (smtpd_timeout), so a later message
comes over a new session that authenticates again, as after a provider's idle timeout."""


def oauth_listener(pki: PeerPKI, sasl_service: str) -> Listener:
    """STARTTLS required, then AUTH XOAUTH2 or OAUTHBEARER only: Dovecot checks the token by
    introspection at the tests' authorization server; RCPT needs AUTH."""
    return Listener(
        OAUTH_LISTENER,
        "STARTTLS required, AUTH XOAUTH2/OAUTHBEARER (Dovecot oauth2 passdb, token "
        "introspection) only after it; RCPT needs AUTH",
        {
            **_tls("encrypt", pki.server),
            **_sasl("dovecot", tls_only=True),
            "smtpd_sasl_service": sasl_service,
            "smtpd_sasl_mechanism_filter": "xoauth2,oauthbearer",
            "smtpd_timeout": f"{OAUTH_IDLE_TIMEOUT}s",
            **_restrict("permit_sasl_authenticated", "reject"),
        },
    )


def master_cf_lines(listener: Listener, host: str, port: int) -> str:
    opts = "".join(f"\n  -o {_option(k, v)}" for k, v in listener.options.items())
    return (
        f"# {listener.name}: {listener.description}\n"
        f"{host}:{port} inet n - n - - smtpd\n"
        f"  -o syslog_name=postfix/{listener.name}{opts}\n"
    )


def _option(name: str, value: str) -> str:
    # master.cf splits on whitespace; Postfix 3.0+ takes "{ name = value with spaces }".
    return f"{{ {name} = {value} }}" if " " in value else f"{name}={value}"


def policy_service_lines(script: Path) -> str:
    return f"{POLICY_SERVICE} unix - n n - 0 spawn\n  user=nobody argv=/bin/sh {script}\n"
