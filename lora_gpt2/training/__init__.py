"""Training: its settings (config), a run built and checked (factory), the loop (loop) that
announces events (events) to subscribers (subscribers, loggers/), the run folder (run_dir),
and what only training needs: metrics.jsonl, the loss plot, FLOPs, DDP.

Add a logger by writing a `Subscriber` (events.py) and registering it in loggers/. The names
below load their module on first use, so the CLI reads the settings without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "train": "loop", "Trainer": "loop", "lr_factor": "optim",
    **{name: "events" for name in ("TrainResult", "Subscriber", "Started", "Stepped", "Evaluated", "Logged",
                                   "Saved", "Notice", "Finished")},
}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from .events import Evaluated, Finished, Logged, Notice, Saved, Started, Stepped, Subscriber, TrainResult
    from .loop import Trainer, train
    from .optim import lr_factor


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
