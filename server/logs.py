"""Log set-up: the standard ``logging`` module with one plain format."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT)
