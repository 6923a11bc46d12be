"""`python -m coordinator` is the `anvil` command."""

import sys

from coordinator.cli import main

sys.exit(main())
