"""`--log wandb`: the same scalars, the resolved config, and the final val loss in the run's
summary. W&B's own environment applies (WANDB_MODE=offline, WANDB_PROJECT, WANDB_ENTITY, ...);
its files go to RUN/wandb/, and a resumed run continues the same W&B run."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ...atomic import write_text
from ..config import TrainConfig
from ..events import Finished, Logged, Started, Subscriber
from . import SCALARS
from ...runs import RunFolder

DEFAULT_PROJECT = "lora-gpt2"


class WandbLog(Subscriber):
    def __init__(self, config: TrainConfig, out: Path) -> None:
        self.config, self.out = config, out
        self.run = None
        self.where = ""  # told once the run has started

    def _run_id(self) -> str:
        path = RunFolder(self.out).wandb_id
        saved = path.read_text().strip() if path.is_file() else ""
        if saved:
            return saved
        run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
        write_text(path, run_id + "\n")
        return run_id

    def on_started(self, event: Started) -> None:
        import wandb

        self.run = wandb.init(
            project=None if os.environ.get("WANDB_PROJECT") else DEFAULT_PROJECT,
            dir=str(self.out), name=self.out.resolve().name, id=self._run_id(), resume="allow",
            config=self.config.to_dict(), settings=wandb.Settings(silent=True),
        )
        offline = self.run.settings.mode in ("offline", "dryrun")
        self.where = (f"offline run in {self.run.dir}; upload it with: wandb sync {Path(self.run.dir).parent}"
                      if offline else str(self.run.url))

    def on_logged(self, event: Logged) -> None:
        record = event.record
        self.run.log({SCALARS[k]: v for k, v in record.items() if k in SCALARS}, step=record["step"])

    def on_finished(self, event: Finished) -> None:
        result = event.result
        self.run.summary.update({"final_val_loss": result.last_val_loss, "best_val_loss": result.best_val_loss,
                                 "step": result.step})
        self.close()

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()
