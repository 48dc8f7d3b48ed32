"""Batches from memmapped token files: seeded random windows for training, fixed ones for eval.

A training batch is a pure function of (seed, step, micro-step): nothing to carry between
steps, so resuming at step k draws exactly what an uninterrupted run would have drawn, and
rank r of W draws rows [r*B, (r+1)*B) of the global batch that one process would draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .prepare import TOKEN_DTYPE


def open_tokens(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of uint16 tokens")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]  # inputs, next-token targets: (B, T) each


@dataclass(frozen=True)
class TrainBatches:
    """Random windows of `block_size + 1` tokens, seeded by (seed, step, micro)."""

    tokens: np.ndarray
    batch_size: int  # per rank
    block_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if len(self.tokens) < self.block_size + 1:
            raise DataError(
                f"train split has {len(self.tokens)} tokens; a window at block size "
                f"{self.block_size} needs {self.block_size + 1}"
            )

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        state = np.random.SeedSequence([self.seed, step, micro]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state))
        high = len(self.tokens) - self.block_size  # last valid start + 1
        starts = torch.randint(high, (self.batch_size * self.world_size,), generator=g).numpy()
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.block_size)


def eval_windows(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int,
                 split: str = "val"):
    """Deterministic, evenly spaced windows over `tokens`: the same for every evaluation."""
    needed = block_size + 1
    if len(tokens) < needed:
        raise DataError(
            f"{split} split has {len(tokens)} tokens; one evaluation window at block size "
            f"{block_size} needs {needed}"
        )
    last_start = len(tokens) - needed
    possible = last_start // block_size + 1  # non-overlapping windows that fit
    count = min(possible, batch_size * max_batches)
    starts = np.linspace(0, last_start, count).round().astype(np.int64) if count > 1 else np.zeros(1, np.int64)
    return [_windows(tokens, starts[i : i + batch_size], block_size) for i in range(0, count, batch_size)]
