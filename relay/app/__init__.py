"""The daemon: `Relay` (relay.app.lifecycle: start-up, reload, shutdown) and `serve` /
`run` (relay.app.serve: the main loop, signals, systemd). Which upstream sends, and
`check --connect`, are relay.upstream.choose.
"""

from relay.app.lifecycle import PID_FILE, SHUTDOWN_GRACE, Relay
from relay.app.notes import loop_name
from relay.app.serve import run, serve
from relay.listener.worker import loop_factory
from relay.upstream.choose import check_connect, local_hostname, make_upstream

__all__ = ["PID_FILE", "SHUTDOWN_GRACE", "Relay", "check_connect", "local_hostname",
           "loop_factory", "loop_name", "make_upstream", "run", "serve"]
