"""Loggers besides metrics.jsonl and loss.png: each is a subscriber in its own module, built only
when `--log` names it, from an optional extra.

A logger must never stop training: `Guarded` reports its first failure once and drops it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..events import Event, Notice, Subscriber

if TYPE_CHECKING:  # the settings read this table (the --log choices): no import back at run time
    from ..config import TrainConfig


@dataclass(frozen=True)
class Logger:
    module: str  # in this package
    cls: str
    package: str  # what it needs installed
    extra: str  # pip install 'lora-gpt2[extra]'


LOGGERS = {
    "tensorboard": Logger("tensorboard_log", "TensorBoardLog", "tensorboard", "tensorboard"),
    "wandb": Logger("wandb_log", "WandbLog", "wandb", "wandb"),
}

# metrics.jsonl key -> the scalar's name in a logger (step and elapsed_s are the axes, not scalars)
SCALARS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "val/loss",
    "val_ppl": "val/perplexity",
}


def check_installed(names: tuple[str, ...]) -> None:
    """Refuse a run whose --log names a logger whose package is missing, before anything starts."""
    for name in names:
        logger = LOGGERS[name]
        if importlib.util.find_spec(logger.package) is None:
            raise ValueError(f"--log {name} needs the {logger.package} package: "
                             f"pip install 'lora-gpt2[{logger.extra}]'")


def build(config: TrainConfig, notify: Callable[[Event], None]) -> list[Subscriber]:
    subscribers: list[Subscriber] = []
    for name in config.run.log:
        logger = LOGGERS[name]
        module = importlib.import_module(f"{__name__}.{logger.module}")
        subscribers.append(Guarded(name, getattr(module, logger.cls)(config, Path(config.run.out)), notify))
    return subscribers


class Guarded(Subscriber):
    """Passes events to a logger until it first raises; then says so once and drops it."""

    def __init__(self, name: str, logger: Subscriber, notify: Callable[[Event], None]) -> None:
        self.name, self.logger, self.notify = name, logger, notify
        self.dropped = False

    def handle(self, event: Event) -> None:
        if self.dropped:
            return
        try:
            self.logger.handle(event)
            if event.kind == "started" and getattr(self.logger, "where", ""):
                self.notify(Notice(f"--log {self.name}: {self.logger.where}"))
        except Exception as exc:  # noqa: BLE001 - any failure of a logger is the logger's
            self.dropped = True
            close = getattr(self.logger, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - it has failed already; the first error is the one to tell
                    pass
            message = " ".join(str(exc).split()) or "no message"
            self.notify(Notice(f"--log {self.name} failed ({type(exc).__name__}: {message}); "
                               "training goes on without it"))
