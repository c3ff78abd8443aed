"""OAuth 2.0 for the upstream: providers and the scopes they need, grants (a person's
sign-in, the app's client credentials with a secret or a certificate's signed
assertion, a Google service account's JWT bearer grant), the token store on disk,
refresh, the authorization state, and signing in from a terminal.

It may import spool (for the state directory's files), settings, errors and
metrics; nothing that sends or receives mail.
"""
