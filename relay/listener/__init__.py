"""Intake: the aiosmtpd server applications hand their mail to, its policy
(allowed networks, limits, replies) and the DATA stream into the spool; also the
client side (`submit`, and `submit_target`: which listener) that `send-test` and the
sendmail drop-in use; and the intake worker processes (`workers`, `worker`, `slots`)
of `listener.workers`.

It may import spool, rewrite, settings, errors, metrics and logs; never upstream,
delivery, admin, app or cli.
"""
