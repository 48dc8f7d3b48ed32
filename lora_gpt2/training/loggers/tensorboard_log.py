"""`--log tensorboard`: scalars as metrics.jsonl has them, and the hyper-parameters with the final
val loss, in RUN/tensorboard/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..events import Finished, Logged, Notice, Saved, Started, Subscriber
from . import SCALARS
from ...runs import RunFolder


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """TensorBoard's hparams take numbers, strings and booleans only."""
    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, list):
                value = ",".join(map(str, value))
            flat[f"{section}.{key}"] = "none" if value is None else value
    return flat


class TensorBoardLog(Subscriber):
    def __init__(self, config: TrainConfig, out: Path) -> None:
        self.config, self.path = config, RunFolder(out).tensorboard
        self.writer = None
        self.where = ""

    def on_started(self, event: Started) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run trains again from its checkpoint's step: events an earlier session logged
        # for the steps after it (before a crash) are discarded, so each step shows once
        self.writer = SummaryWriter(str(self.path), purge_step=event.step + 1 if event.step else None)
        self.where = f"tensorboard --logdir {self.path}"

    def on_logged(self, event: Logged) -> None:
        step = event.record["step"]
        for key, value in event.record.items():
            if key in SCALARS:
                self.writer.add_scalar(SCALARS[key], value, step)

    def on_saved(self, event: Saved) -> None:
        self.writer.flush()  # what a checkpoint holds is on disk with it

    def on_finished(self, event: Finished) -> None:
        from torch.utils.tensorboard.summary import hparams

        result = event.result
        metrics = {"hparams/final_val_loss": result.last_val_loss, "hparams/best_val_loss": result.best_val_loss}
        metrics = {k: v for k, v in metrics.items() if v is not None}
        experiment, start, end = hparams(flat_hparams(self.config), metrics)
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, result.step)
        self.close()

    def on_notice(self, event: Notice) -> None:
        pass

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
