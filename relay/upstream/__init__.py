"""The upstream: the `Upstream` protocol a delivery hands a message to, error
translation into deferred / failed / auth failures, SMTP over aiosmtplib's public
API with SASL DIGEST-MD5, POP3 and POP before SMTP, Microsoft Graph and the Gmail
API over httpx, the built-in local outbox, which of them sends (`choose`), and the
step-by-step connection probe of `check --connect`.

It may import oauth, spool, rewrite, settings, errors and metrics; never the
listener, delivery, admin, app or cli.
"""
