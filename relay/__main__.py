"""`python -m relay` is `sysmail-relay`."""

import sys

from relay.cli import main

sys.exit(main())
