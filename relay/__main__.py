"""`python -m relay` is `sysmail-relay`."""

import sys

from .cli import main

sys.exit(main())
