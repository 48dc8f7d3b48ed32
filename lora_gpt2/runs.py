"""What a training run's folder holds, each path named once: the trainer writes them, and
readers, the server, `plot` and the CLI find them here. No other module spells these names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = ("best", "last")  # the checkpoint folders of a run, in the order a reader prefers


@dataclass(frozen=True)
class RunFolder:
    """RUN/: best/ (the best validation loss), last/ (the last step, with the state to resume),
    metrics.jsonl, loss.png, config.json (the resolved settings), .lock (the owner's flock) and
    the loggers' files (tensorboard/, wandb-run-id)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def checkpoint(self, name: str) -> Path:
        if name not in CHECKPOINTS:
            raise ValueError(f"a run holds the checkpoints {', '.join(CHECKPOINTS)}, not {name!r}")
        return self.root / name

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def last(self) -> Path:
        return self.root / "last"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb-run-id"  # a resumed run continues the same W&B run

    @property
    def orphans(self) -> tuple[Path, ...]:
        """What a new run in a folder whose earlier run never checkpointed removes (the loggers'
        files too: a new run is a new W&B run)."""
        return (self.metrics, self.plot, self.tensorboard, self.wandb_id)

    def holds_checkpoints(self) -> bool:
        return any((self.root / name).exists() for name in CHECKPOINTS)
