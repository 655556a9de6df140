"""Log lines printed above a live progress bar on the same terminal.

A bar is redrawn in place on stderr; a logging handler writing to that terminal (Hydra's, on stdout,
or a script's `basicConfig`, on stderr) wrote its lines straight after the bar's last frame, so each
ISNE epoch line was glued to a stale bar. While a bar is live, such handlers write through a
stream that has the bar's console print each finished line above it, unwrapped. Handlers writing
to a file or a pipe are left alone (a redirected log must not move to the terminal). Its own
module: both bars (the ingest's in `orchestration`, ISNE's in `isne`) use it, and neither layer may
import the other.
"""

from __future__ import annotations

import io
import logging
from typing import Any


def _terminal_handlers() -> list[logging.StreamHandler]:
    found = []
    for logger in (logging.getLogger(), logging.getLogger("hades_gpu")):
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                try:
                    if stream is not None and stream.isatty():
                        found.append(handler)
                except (AttributeError, ValueError):  # a closed stream, or one without isatty
                    continue
    return found


class _LinesAboveTheBar(io.TextIOBase):
    """A stream whose finished lines `console` prints above its live display, as they are (rich's own
    FileProxy prints them wrapped at the terminal's width: a copied log had its lines broken)."""

    def __init__(self, console: Any, stream: Any) -> None:
        super().__init__()
        self.console = console
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        if lines:
            from rich.text import Text

            self.console.print(Text("\n".join(lines)), soft_wrap=True, highlight=False, markup=False)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            self.write(pending + "\n")

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()


class LogsAbove:
    """While started, terminal log handlers print through a live rich display's console; `stop()`
    gives them their own streams back (and prints a line still without its newline)."""

    def __init__(self) -> None:
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []

    def start(self, console: Any) -> None:
        if not self._swapped:
            self._swapped = [(h, h.setStream(_LinesAboveTheBar(console, h.stream))) for h in _terminal_handlers()]

    def stop(self) -> None:
        swapped, self._swapped = self._swapped, []
        for handler, original in swapped:
            proxy = handler.setStream(original)
            if proxy is not None:
                proxy.flush()
