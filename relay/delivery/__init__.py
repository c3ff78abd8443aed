"""Delivery: the scheduler that drains the spool through the upstream (with its
queue `index`, one `attempt` at a time, and the relay's own `trouble`s), its pure
retry policy, the per-server health it learns on the way, and dead letters with
their notices.

It may import upstream, oauth, spool, rewrite, settings, errors and metrics;
never the listener, admin, app or cli.
"""
