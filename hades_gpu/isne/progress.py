"""A progress bar for ISNE training on a terminal: batches done of every epoch asked, and the ETA.

Training logs one line per epoch, which a plain script or a notebook that configured no logging
never shows: `ISNETrainingPipeline.train(epochs=50)` sat silent for minutes. On a terminal (or with
`monitoring.progress=on`) the stage draws this bar on stderr, as the ingest draws its own
(`orchestration.monitoring`, a module of the same layer, hence this small twin of it).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from hades_gpu.config import ProgressMode
from hades_gpu.console_logs import LogsAbove


class TrainingProgress:
    """`update(epoch, done, n_batches, epochs)` after each batch; `stop()` at the end.

    Args:
        mode (str): `monitoring.progress`: ``auto`` and ``on`` draw on a terminal, ``off`` never.
        console (rich Console, optional): where to draw (tests); default stderr.
    """

    def __init__(self, mode: str = "auto", console: Any = None, budget_s: Optional[float] = None) -> None:
        self.budget_s = budget_s  # a time budget ends training before its epochs: the bar's total says so
        self._started = time.monotonic()
        # a bar where one can be drawn, as the ingest's: elsewhere the per-epoch log lines say as much
        self.enabled = mode != ProgressMode.OFF and (console is not None or sys.stderr.isatty())
        self.console = console
        self._bar: Any = None
        self._task: Optional[int] = None
        self._where = ""
        self._logs = LogsAbove()

    def update(self, epoch: int, done: int, n_batches: int, epochs: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]isne"), BarColumn(bar_width=10), TextColumn("{task.fields[where]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                                 console=self.console if self.console is not None else Console(stderr=True))
            self._bar.start()
            self._logs.start(self._bar.console)  # the epoch log lines above the bar, not glued to its frame
            # a resumed training starts part-way: the bar counts from there
            self._task = self._bar.add_task("isne", total=max(epochs * n_batches, 1),
                                            completed=(epoch - 1) * n_batches, where="")
        completed = (epoch - 1) * n_batches + done
        total = max(epochs * n_batches, 1)
        elapsed = time.monotonic() - self._started
        if self.budget_s is not None and elapsed > 0 and completed:
            # at this rate the budget ends training after this many batches: the ETA said 7 minutes
            # while a 6 s budget stopped it
            total = min(total, max(completed, int(completed * self.budget_s / elapsed)))
        self._where = f"epoch {epoch}/{epochs}, batch {done}/{n_batches}"
        self._bar.update(self._task, total=total, completed=completed,
                         where=self._where + (f", budget {self.budget_s:.3g} s" if self.budget_s is not None else ""))

    def stop(self, outcome: Optional[str] = None) -> None:
        """`outcome` ("stopped early", "time budget reached", "done"): the last frame says how training
        ended and is drawn complete (it stayed at "ETA 7:07" after a budget stop)."""
        if self._bar is not None:
            if outcome is not None and self._task is not None:
                task = self._bar.tasks[0]
                self._bar.update(self._task, total=max(task.completed, 1), completed=max(task.completed, 1),
                                 where=f"{self._where}: {outcome}")
            self._bar.refresh()
            self._bar.stop()
            self._bar = None
        self._logs.stop()
