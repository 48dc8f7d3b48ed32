"""The subscribers every run has on rank 0: metrics.jsonl and loss.png."""

from __future__ import annotations

from pathlib import Path

from . import metrics
from ..runs import RunFolder
from .plot import PLOT_HINT, draw_loss, plot_available
from .events import Logged, Notice, Started, Subscriber



class MetricsLog(Subscriber):
    """Appends each logged record to RUN/metrics.jsonl."""

    def __init__(self, out: Path) -> None:
        self.path = RunFolder(out).metrics

    def on_logged(self, event: Logged) -> None:
        metrics.append(self.path, event.record)


class LossPlot(Subscriber):
    """Redraws RUN/loss.png at every evaluation (when matplotlib is installed; else says so once)."""

    def __init__(self, out: Path, title: str, notify) -> None:
        self.folder, self.title, self.notify = RunFolder(out), title, notify
        self.available = plot_available()

    def on_started(self, event: Started) -> None:
        if not self.available:
            self.notify(Notice(f"no {self.folder.plot.name}: {PLOT_HINT}"))

    def on_logged(self, event: Logged) -> None:
        if self.available and event.evaluated:
            draw_loss(self.folder.metrics, self.folder.plot, title=self.title)
