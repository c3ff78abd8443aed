"""sysmail-relay: a local SMTP relay for an organisation's system mail account."""

__version__ = "0.1.0"
