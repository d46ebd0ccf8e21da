"""Progress bars that behave in a log: a live tqdm bar on a terminal, one log line every N seconds elsewhere.

tqdm redraws its bar with carriage returns; written to a file or a pipe (``make demo > log``, a container's
stdout) every redraw becomes a line, hundreds per bar. ``progress()`` keeps tqdm's bar and its rate on a
terminal and otherwise sends the same meter text through ``logging`` at most every ``interval_s``, starting
``interval_s`` after the bar (no ``0/N [?it/s]`` line of placeholders first; a bar done sooner logs only its final
count, and only if it is kept: ``leave``), and a postfix set on it shows in its next line rather than forcing one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

#: Seconds between progress lines when the output is not a terminal.
LOG_INTERVAL_S = 10.0

log = logging.getLogger("postsense.progress")


class _LogWriter:
    """A file for tqdm that turns each redraw into one log record (carriage returns and padding dropped)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.logger.info("%s", line)

    def flush(self) -> None:
        pass


class _LoggedBar(tqdm):
    """A bar whose postfix and description wait for its next timed line instead of writing one each (a loop that
    sets them per step or epoch would otherwise log a line each time)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def close(self) -> None:
        # A bar kept (``leave``) that finished before its first line still logs its final count, once.
        delay: float = getattr(self, "delay", 0.0)
        if not self.disable and self.leave and self.last_print_t < self.start_t + delay:
            self.delay = 0
        super().close()


def is_terminal(stream: IO[str] | None) -> bool:
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    interval_s: float = LOG_INTERVAL_S,
    file: IO[str] | None = None,
    logger: logging.Logger | None = None,
) -> tqdm:
    """A tqdm bar on ``file`` (stderr) when it is a terminal; else a bar that logs a line every ``interval_s``.

    Use it as tqdm: ``for x in progress(items, desc="encode"): ...`` or ``bar = progress(total=n); bar.update(k)``.
    """
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=stream)
    return _LoggedBar(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        leave=leave,
        file=_LogWriter(logger or log),
        mininterval=interval_s,
        maxinterval=interval_s,
        delay=interval_s,
        ascii=True,
        ncols=100,
    )
