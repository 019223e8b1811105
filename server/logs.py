"""Log set-up: the standard ``logging`` module with two costs taken out of the
per-job log lines (three per job: waiting, running, done)."""

from __future__ import annotations

import logging
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Formatter(logging.Formatter):
    """``logging.Formatter`` with the default ``asctime`` (``2026-11-22 06:41:17,123``),
    formatting the date and time once per second instead of once per record."""

    _second = -1
    _prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._prefix},{int(record.msecs):03d}"


def setup(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # the format uses none of these: skip collecting them for every record; with
    # _srcfile unset, logging does not walk the stack for the caller's file and line
    # (the logging HOWTO's "Optimization" section)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
