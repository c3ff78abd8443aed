"""Intake: the aiosmtpd server applications hand their mail to, its policy
(allowed networks, limits, replies) and the DATA stream into the spool; also the
client side (`submit`, and `submit_target`: which listener) that `send-test` and the
sendmail drop-in use; and the intake worker processes (`workers`, `worker`, `slots`,
`cpus`: how many) of `listener.workers`.

`server` (the Listener: sockets, connection policy, a message into the spool),
`protocol` (one session: aiosmtpd's SMTP with overridden `smtp_*` commands),
`handler` (aiosmtpd hooks: the envelope's policy), `addresses` and `replies`
(pure rules and texts), `data` (DATA streamed in pieces). aiosmtpd is used
through its documented extension points; what it offers no way for lives in
`aiosmtpd_internals` alone, which names each private member it relies on.

It may import spool, rewrite, settings, errors, metrics and logs; never upstream,
delivery, admin, app or cli.
"""
