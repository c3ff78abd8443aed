"""The operator's surfaces: the admin HTTP listener (metrics, health, status, the
account page and its Change form) and the `status` and `queue` commands.

It sees the running daemon only through `relay.admin.daemon.Daemon`, a small
Protocol of what it needs, and never imports `relay.app`. It may import every
layer below it: the listener's submission client, delivery, upstream, oauth,
spool, settings, errors and metrics.
"""
