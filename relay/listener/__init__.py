"""Intake: the aiosmtpd server applications hand their mail to, its policy
(allowed networks, limits, replies) and the DATA stream into the spool; also the
client side (`submit`, and `submit_target`: which listener) that `send-test` and the
sendmail drop-in use.

It may import spool, rewrite, settings, errors and metrics; never upstream,
delivery, admin, app or cli.
"""
