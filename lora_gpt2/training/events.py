"""What the training loop announces. Subscribers (metrics.jsonl, loss.png, the terminal view,
and any logger) receive these and act; the loop knows none of them.

A subscriber derives from `Subscriber` and overrides the `on_<kind>` methods it cares about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class TrainResult:
    step: int
    max_steps: int
    best_val_loss: float | None
    last_val_loss: float | None
    out: Path
    interrupted: bool
    seconds: float
    tokens_per_s: float  # over this session's steps, evaluations and checkpoints included
    mfu: float | None  # model FLOPs / the device's measured dense matmul rate; None unless asked
    stop_reason: str | None = None  # what asked the run to stop early ("SIGTERM", ...), if anything


@dataclass(frozen=True)
class Started:
    kind: ClassVar[str] = "started"
    model: str
    trainable: int
    total: int
    tokens_per_step: int
    device: str
    dtype: str
    dtype_choice: str  # "asked for", or "auto: <why>"
    world_size: int
    step: int
    max_steps: int
    out: Path


@dataclass(frozen=True)
class Stepped:
    """One optimiser step is done (every step)."""

    kind: ClassVar[str] = "stepped"
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    grad_norm: float  # of all adapter gradients, before clipping


@dataclass(frozen=True)
class Evaluated:
    kind: ClassVar[str] = "evaluated"
    step: int
    val_loss: float
    best: bool


@dataclass(frozen=True)
class Logged:
    """A metrics record is due (every log interval and every evaluation): what metrics.jsonl holds."""

    kind: ClassVar[str] = "logged"
    record: dict[str, Any]

    @property
    def evaluated(self) -> bool:
        return "val_loss" in self.record


@dataclass(frozen=True)
class Saved:
    kind: ClassVar[str] = "saved"
    path: Path
    step: int


@dataclass(frozen=True)
class Notice:
    """Something the user should read once (a changed setting on resume, a missing extra)."""

    kind: ClassVar[str] = "notice"
    message: str


@dataclass(frozen=True)
class Finished:
    kind: ClassVar[str] = "finished"
    result: TrainResult


Event = Started | Stepped | Evaluated | Logged | Saved | Notice | Finished


class Subscriber:
    """Override what you need; every method receives its event and returns nothing."""

    def on_started(self, event: Started) -> None: ...
    def on_stepped(self, event: Stepped) -> None: ...
    def on_evaluated(self, event: Evaluated) -> None: ...
    def on_logged(self, event: Logged) -> None: ...
    def on_saved(self, event: Saved) -> None: ...
    def on_notice(self, event: Notice) -> None: ...
    def on_finished(self, event: Finished) -> None: ...

    def handle(self, event: Event) -> None:
        getattr(self, f"on_{event.kind}")(event)
