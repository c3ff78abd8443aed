"""Several relays sending for one system account, through Redis or Valkey (`[fleet]`).

`node` is this relay's membership (heartbeats, who is alive, whether Redis answers),
`limits` a server's rate, daily quota and connections shared by the fleet (with a local
share while Redis is unreachable), `scripts` the atomic steps they run in Redis,
`account` the shared Active / Inactive state, `tokens` the shared, encrypted OAuth
tokens and the refresh lock, `connect` the clients and key names. Imported only when
`[fleet]` is configured: a single relay never loads redis.
"""

from relay.fleet.limits import FleetLimits
from relay.fleet.node import Fleet

__all__ = ["Fleet", "FleetLimits"]
