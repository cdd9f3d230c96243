"""`python -m daemon` runs the command line."""

from __future__ import annotations

import sys

from daemon.cli import main

sys.exit(main())
