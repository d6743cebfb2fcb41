"""Run the command line with ``python -m proxy``."""

from __future__ import annotations

import sys

from proxy.cli import main

sys.exit(main())
