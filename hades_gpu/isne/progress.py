"""A progress bar for ISNE training on a terminal: batches done of every epoch asked, and the ETA.

Training logs one line per epoch, which a plain script or a notebook that configured no logging
never shows: `ISNETrainingPipeline.train(epochs=50)` sat silent for minutes. On a terminal (or with
`monitoring.progress=on`) the stage draws this bar on stderr, as the ingest draws its own
(`orchestration.monitoring`, a module of the same layer, hence this small twin of it).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from hades_gpu.config import ProgressMode


class TrainingProgress:
    """`update(epoch, done, n_batches, epochs)` after each batch; `stop()` at the end.

    Args:
        mode (str): `monitoring.progress`: ``auto`` and ``on`` draw on a terminal, ``off`` never.
        console (rich Console, optional): where to draw (tests); default stderr.
    """

    def __init__(self, mode: str = "auto", console: Any = None) -> None:
        # a bar where one can be drawn, as the ingest's: elsewhere the per-epoch log lines say as much
        self.enabled = mode != ProgressMode.OFF and (console is not None or sys.stderr.isatty())
        self.console = console
        self._bar: Any = None
        self._task: Optional[int] = None

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
            # a resumed training starts part-way: the bar counts from there
            self._task = self._bar.add_task("isne", total=max(epochs * n_batches, 1),
                                            completed=(epoch - 1) * n_batches, where="")
        self._bar.update(self._task, completed=(epoch - 1) * n_batches + done,
                         where=f"epoch {epoch}/{epochs}, batch {done}/{n_batches}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.refresh()
            self._bar.stop()
            self._bar = None
