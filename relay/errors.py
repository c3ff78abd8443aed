"""Every error the relay raises, in one tree.

    RelayError
    ├── ConfigError (ValueError)            the configuration is invalid; .problems, one line each
    ├── SpoolError (OSError)                the spool could not store, read or move an entry
    │   └── DamagedEntry                    an entry on disk cannot be read back (quarantined)
    ├── StateLocked                         another process holds the state directory's lock
    ├── DeliveryFailure                     an attempt to hand a message to the upstream failed
    │   ├── TemporaryFailure                try again later (4xx, timeouts, connections, auth)
    │   │   ├── UpstreamTimeout (TimeoutError)
    │   │   ├── UpstreamUnreachable (ConnectionError)
    │   │   ├── AuthenticationFailure       the server refused our credentials
    │   │   └── Held                        not sent on purpose (inactive, OAuth not granted)
    │   └── PermanentFailure                the server refused for good (5xx)
    ├── Pop3Error                           the POP3 server refused or broke the dialogue
    │   └── Pop3Timeout (TimeoutError)
    ├── SaslError                           a SASL exchange went wrong on the client side
    ├── OAuthError                          sign-in, token refresh or the token store failed
    │   ├── NotGranted                      no usable authorization: `oauth authorize` (held)
    │   │   └── CredentialError             the app's own key, certificate or secret is unusable
    │   │                                   or refused: the configuration must change (held)
    │   ├── TokenStoreError                 a token file is unsafe or unreadable (held)
    │   ├── ProviderRefused                 the provider answered an OAuth error (access_denied ...)
    │   └── ProviderUnreachable (ConnectionError)   the provider did not answer (deferred)
    └── SubmitError                         `send-test` / `sendmail` could not hand over a message

Every message names the cause and what to do about it; none contains a secret.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Root of every error raised by sysmail-relay."""


class ConfigError(RelayError, ValueError):
    """The configuration is invalid. `problems` holds one line per mistake."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class SpoolError(RelayError, OSError):
    """The spool could not store, read or move an entry."""


class DamagedEntry(SpoolError):
    """An entry on disk cannot be read back; it is moved to quarantine."""


class StateLocked(RelayError):
    """Another process holds the state directory's lock; `holder` (a relay.spool.state.Holder)
    says who."""

    def __init__(self, message: str, holder: Any) -> None:
        super().__init__(message)
        self.holder = holder


class DeliveryFailure(RelayError):
    """An attempt to hand a message to the upstream failed.

    `reply` is the server's answer (or our description of what happened), kept
    for the log, `queue show`, `status` and the dead letter.
    """

    def __init__(self, reply: str, *, code: int | None = None, stage: str | None = None,
                 retry_at: float | None = None) -> None:
        self.reply = reply
        self.code = code
        self.stage = stage
        self.retry_at = retry_at
        super().__init__(reply)


class TemporaryFailure(DeliveryFailure):
    """Try again later: 4xx replies, timeouts, lost connections."""


class UpstreamTimeout(TemporaryFailure, TimeoutError):
    """The upstream did not answer within the server's timeout."""


class UpstreamUnreachable(TemporaryFailure, ConnectionError):
    """The upstream could not be reached or closed the connection."""


class AuthenticationFailure(TemporaryFailure):
    """The upstream refused our credentials (535 and friends)."""


class Held(TemporaryFailure):
    """The message is deliberately not sent yet (account inactive, OAuth not granted)."""


class PermanentFailure(DeliveryFailure):
    """The upstream refused for good (5xx)."""


class Pop3Error(RelayError):
    """The POP3 server refused a command or broke the dialogue. `reply` is its answer."""

    def __init__(self, reply: str, *, stage: str | None = None) -> None:
        self.reply = reply
        self.stage = stage
        super().__init__(reply)


class Pop3Timeout(Pop3Error, TimeoutError):
    """The POP3 server did not answer within the timeout."""


class SaslError(RelayError):
    """A SASL exchange went wrong on the client side (for example a wrong rspauth)."""


class OAuthError(RelayError):
    """Signing in, refreshing a token or using the token store failed; says what to do."""

    def __init__(self, message: str, *, logged: bool = False) -> None:
        self.logged = logged
        """True when the relay has logged it already (the keep-alive does not again)."""
        super().__init__(message)


class NotGranted(OAuthError):
    """There is no usable authorization (never signed in, refresh token refused): a person
    must run `sysmail-relay oauth authorize`. Mail waits ("held") meanwhile."""


class CredentialError(NotGranted):
    """The app's own credential (client secret, client certificate and key, service-account
    key) cannot be used or the provider refused it: no sign-in helps; the message names
    the file, the provider's console setting or the permission to fix. Mail is held."""


class TokenStoreError(OAuthError):
    """A token file cannot be used: readable by others, unreadable or damaged."""


class ProviderRefused(OAuthError):
    """The provider answered with an OAuth error. `error` is its code (`invalid_grant`,
    `access_denied`, `invalid_client` ...), `description` its explanation."""

    def __init__(self, message: str, *, error: str, description: str | None = None) -> None:
        self.error = error
        self.description = description
        super().__init__(message)


class ProviderUnreachable(OAuthError, ConnectionError):
    """The provider's token endpoint could not be reached or failed (5xx): try again later."""


class SubmitError(RelayError):
    """A message could not be handed to the relay's listener.

    `temporary` is true when trying again later may work (listener down, 4xx).
    """

    def __init__(self, message: str, *, temporary: bool) -> None:
        self.temporary = temporary
        super().__init__(message)
