"""What the admin listener sees of the running daemon: a small Protocol, not `relay.app`.

`relay.app.Relay` satisfies it; the admin package never imports the application, so
the pages and the daemon's lifecycle can change apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from relay.delivery.scheduler import Scheduler
from relay.metrics import Metrics
from relay.oauth.manager import OAuth
from relay.settings import Settings
from relay.spool import Spool


class Daemon(Protocol):
    settings: Settings
    """The configuration in force (a reload replaces it)."""
    config_file: Path | None
    """The file it was loaded from; None for the built-in default."""
    spool: Spool
    oauth: OAuth
    metrics: Metrics
    scheduler: Scheduler | None
    """None until the daemon has started."""
    stopping: bool
    """True from SIGTERM on: /readyz says so."""

    @property
    def listener_address(self) -> tuple[str, int] | None:
        """Where the SMTP listener accepts, None when it does not (yet)."""

    def reload(self) -> bool:
        """Load the configuration again (as SIGHUP does); False when it was refused."""

    def activate(self, active: bool) -> None:
        """Activate / Deactivate chosen on the page, before the reload that applies it
        (with [fleet]: for the whole fleet)."""

    def fleet_status(self) -> dict[str, Any] | None:
        """The fleet as this relay sees it (relay.fleet.node), None without `[fleet]`."""

    async def rescan(self) -> None:
        """Look at the queue on disk again (after the CLI or the page changed it)."""
