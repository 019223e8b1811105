"""``python -m clients ...``: see clients/cli.py."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
