"""Log set-up: the standard ``logging`` module, with the server's own format
written in one step.  Every job logs three lines (waiting, running, done), and
``logging``'s generic path costs a dozen calls per record."""

from __future__ import annotations

import logging
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # what Formatter writes


class Formatter(logging.Formatter):
    """``logging.Formatter(FORMAT)`` (``2026-11-22 06:41:17,123 INFO easel: message``
    plus any traceback), formatted with one f-string, and the date and time
    formatted once per second instead of once per record."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._prefix},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def setup(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(Formatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # the format uses none of these: skip collecting them for every record; with
    # _srcfile unset, logging does not walk the stack for the caller's file and line
    # (the logging HOWTO's "Optimization" section)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
