"""OAuth 2.0 for the upstream: providers, grants, the token store on disk,
refresh, the authorization state, and signing in from a terminal.

It may import spool (for the state directory's files), settings, errors and
metrics; nothing that sends or receives mail.
"""
