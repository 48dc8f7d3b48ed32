"""Batches from memmapped token files: seeded draws for training, fixed ones for eval.

Stream data (text, documents) gives random windows of `block_size + 1` tokens, every target
counted. Example data gives whole examples, one per row, right-padded to the batch's longest:
causal attention never lets a token see the padding after it, so no example sees another and
no attention mask is needed. A target that is padding, or prompt under --mask-prompt, is -1
(not counted). An example longer than the window loses tokens from the left of its prompt
first (the completion is what matters), then from its end.

A training batch is a pure function of (seed, step, micro-step): nothing to carry between
steps, so resuming at step k draws exactly what an uninterrupted run would have drawn, and
rank r of W draws rows [r*B, (r+1)*B) of the global batch that one process would draw. That
also lets every rank count the targets of the whole step (all ranks, all micro-batches)
without talking to the others: the loss of a step is its sum over that count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..chat_template import ASSISTANT, LEARN, MESSAGE, SYSTEM
from ..errors import DataError
from .prepare import INDEX_DTYPE, TOKEN_DTYPE

IGNORE = -1  # a target that is not counted (padding, or a masked prompt)


@dataclass(frozen=True)
class Batch:
    """Inputs and targets (B, T) of one micro-batch. `segments` (B, T), for packed rows, numbers
    the example each position belongs to (0 is padding); None when a row is one sequence."""

    x: torch.Tensor
    y: torch.Tensor
    segments: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.x), move(self.y), move(self.segments))


def open_tokens(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of uint16 tokens")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def open_index(path: Path) -> np.ndarray:
    """(examples, 3) rows of (start, prompt tokens, length)."""
    size = path.stat().st_size
    row = 3 * np.dtype(INDEX_DTYPE).itemsize
    if size % row:
        raise DataError(f"{path} has {size} bytes, not a whole number of {row}-byte index rows")
    return np.fromfile(path, dtype=INDEX_DTYPE).reshape(-1, 3)


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
    accum: int = 1  # micro-batches per step

    def __post_init__(self) -> None:
        if len(self.tokens) < self.block_size + 1:
            raise DataError(
                f"train split has {len(self.tokens)} tokens; a window at block size "
                f"{self.block_size} needs {self.block_size + 1}"
            )

    def counted(self, step: int) -> int:
        """Targets counted in the whole step (all ranks, all micro-batches): every one."""
        return self.batch_size * self.world_size * self.block_size * self.accum

    def get(self, step: int, micro: int = 0) -> Batch:
        state = np.random.SeedSequence([self.seed, step, micro]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state))
        high = len(self.tokens) - self.block_size  # last valid start + 1
        starts = torch.randint(high, (self.batch_size * self.world_size,), generator=g).numpy()
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return Batch(*_windows(self.tokens, mine, self.block_size))


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


def _cut(length: np.ndarray, prompt: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens dropped from the left, kept length, kept prompt tokens) of examples cut to `window`."""
    excess = np.maximum(length - window, 0)
    left = np.minimum(excess, prompt)  # the prompt's start goes first
    kept = np.minimum(length, window)
    return left, kept, prompt - left


def conversation_kept(marks: np.ndarray, window: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a conversation's tokens kept in `window`: all of them when
    they fit; else the fewest whole earliest messages are dropped, keeping the leading system
    message if that still fits, and never the last assistant message or the one it answers.
    When those two alone do not fit, the asking message loses its start (as a prompt does),
    and an answer longer than the window loses its end."""
    n = len(marks)
    if n <= window:
        return [(0, n)]
    starts = np.flatnonzero(marks & MESSAGE)
    answers = np.flatnonzero(marks & ASSISTANT)
    last = int(answers[-1]) if len(answers) else n - 1
    asked = int(starts[starts < last][-1]) if (starts < last).any() else last  # the message it answers
    system = int(np.argmin((marks & SYSTEM) > 0)) if marks[0] & SYSTEM else 0  # its length
    for keep in dict.fromkeys((system, 0)):
        cuts = starts[(starts > keep) & (starts <= asked) & (keep + n - starts <= window)]
        if len(cuts):
            return ([(0, keep)] if keep else []) + [(int(cuts[0]), n)]
    return [(n - window, n)] if n - last <= window else [(last, last + window)]


def _conversation(tokens: np.ndarray, marks: np.ndarray, start: int, length: int, window: int,
                  learn_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """A conversation's kept ids, and which of its targets count (target j predicts id j+1)."""
    own = np.asarray(marks[start : start + length])
    kept = conversation_kept(own, window)
    ids = np.concatenate([np.asarray(tokens[start + a : start + b], dtype=np.int64) for a, b in kept])
    if not learn_only:
        return ids, np.ones(len(ids) - 1, dtype=bool)
    return ids, np.concatenate([own[a:b] for a, b in kept])[1:] & LEARN > 0


def kept_lengths(index: np.ndarray, window: int, marks: np.ndarray | None = None) -> np.ndarray:
    """How many tokens of each example row a window keeps."""
    if marks is None:
        return np.minimum(index[:, 2], window)
    return np.array([sum(b - a for a, b in conversation_kept(np.asarray(marks[s : s + n]), window))
                     for s, n in zip(index[:, 0].tolist(), index[:, 2].tolist())], dtype=np.int64)


def _examples(tokens: np.ndarray, index: np.ndarray, window: int, mask_prompt: bool,
              marks: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each example row's kept ids, and which of its targets count."""
    if marks is not None:
        return [_conversation(tokens, marks, s, n, window, mask_prompt)
                for s, n in zip(index[:, 0].tolist(), index[:, 2].tolist())]
    left, kept, prompt = _cut(index[:, 2], index[:, 1], window)
    out = []
    for start, drop, n, p in zip(index[:, 0], left, kept, prompt):
        ids = np.asarray(tokens[start + drop : start + drop + n], dtype=np.int64)
        learn = np.ones(n - 1, dtype=bool)
        if mask_prompt and p > 1:
            learn[: p - 1] = False
        out.append((ids, learn))
    return out


def counted_targets(index: np.ndarray, window: int, mask_prompt: bool, marks: np.ndarray | None = None,
                    tokens: np.ndarray | None = None) -> np.ndarray:
    """Counted targets of each example row: all kept-1 of them, less the prompt's when masked
    (target j predicts token j+1, which is completion once j+1 >= the kept prompt); for a
    conversation, its learned targets."""
    if marks is not None:
        return np.array([int(learn.sum()) for _, learn in _examples(tokens, index, window, mask_prompt, marks)],
                        dtype=np.int64)
    _, kept, prompt = _cut(index[:, 2], index[:, 1], window)
    targets = kept - 1
    return targets - np.maximum(prompt - 1, 0) if mask_prompt else targets


def example_rows(tokens: np.ndarray, index: np.ndarray, window: int, mask_prompt: bool,
                 marks: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, L) of whole examples, right-padded to the longest (L < window)."""
    examples = _examples(tokens, index, window, mask_prompt, marks)
    width = max(len(ids) for ids, _ in examples) - 1
    x = np.zeros((len(index), width), dtype=np.int64)
    y = np.full((len(index), width), IGNORE, dtype=np.int64)
    for i, (ids, learn) in enumerate(examples):
        x[i, : len(ids) - 1] = ids[:-1]
        y[i, : len(ids) - 1] = np.where(learn, ids[1:], IGNORE)
    return torch.from_numpy(x), torch.from_numpy(y)


@functools.lru_cache(maxsize=2)  # a step draws from one epoch (two at a boundary), 2 x accum times
def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The seeded order of `count` examples in `epoch` (read-only: it is shared)."""
    state = np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1, np.uint64)[0]
    order = np.random.default_rng(int(state)).permutation(count)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class ExampleBatches:
    """Whole examples drawn epoch by epoch (a seeded permutation per epoch), so each example is
    seen once per epoch; `batch_size` rows per rank and micro-batch."""

    tokens: np.ndarray
    index: np.ndarray
    batch_size: int
    block_size: int
    seed: int
    mask_prompt: bool
    rank: int = 0
    world_size: int = 1
    accum: int = 1  # micro-batches per step
    marks: np.ndarray | None = None  # chat data: each token's marks (mask_prompt: learn only LEARN ones)

    def __post_init__(self) -> None:
        if len(self.index) == 0:
            raise DataError("the train split holds no examples")

    @property
    def window(self) -> int:
        return self.block_size + 1

    def _order(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.seed, epoch, len(self.index))

    def _ids(self, step: int, micro: int) -> np.ndarray:
        """Example ids of the global micro-batch (all ranks)."""
        rows = self.batch_size * self.world_size
        first = (step * self.accum + micro) * rows
        positions = np.arange(first, first + rows)
        epochs, within = np.divmod(positions, len(self.index))
        ids = np.empty(rows, dtype=np.int64)
        for epoch in np.unique(epochs):
            ids[epochs == epoch] = self._order(int(epoch))[within[epochs == epoch]]
        return ids

    def counted(self, step: int) -> int:
        """Targets counted in the whole step (all ranks, all micro-batches)."""
        ids = np.concatenate([self._ids(step, m) for m in range(self.accum)])
        return int(self._counted(self.index[ids]).sum())

    def _counted(self, rows: np.ndarray) -> np.ndarray:
        return counted_targets(rows, self.window, self.mask_prompt, self.marks, self.tokens)

    def _rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return example_rows(self.tokens, rows, self.window, self.mask_prompt, self.marks)

    def get(self, step: int, micro: int = 0) -> Batch:
        ids = self._ids(step, micro)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return Batch(*self._rows(self.index[ids]))

    def epoch_rows(self) -> int:
        """Rows that make one pass over the train examples."""
        return len(self.index)

    def truncated(self) -> int:
        """How many train examples are longer than a window (and lose tokens)."""
        return int((self.index[:, 2] > self.window).sum())

    def dropped_messages(self) -> int:
        """Chat data: how many whole messages the window drops from conversations, in all."""
        dropped = 0
        for start, n in self.index[self.index[:, 2] > self.window][:, [0, 2]].tolist():
            own = np.asarray(self.marks[start : start + n])
            kept = conversation_kept(own, self.window)
            starts = np.flatnonzero(own & MESSAGE)
            inside = sum(int(((starts >= a) & (starts < b)).sum()) for a, b in kept)
            dropped += len(starts) - inside
        return dropped


class PackedBatches(ExampleBatches):
    """Whole examples packed several to a row, each seeing only itself: positions restart at 0
    for each example and attention is block-diagonal causal (`Batch.segments`), so a row
    computes what the same examples would alone, without the padding. Each epoch's order is
    packed greedily into rows of at most `block_size` targets; a step takes the next rows.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_rows_in_epoch", [])  # a frozen dataclass may still cache
        object.__setattr__(self, "_plans", {})

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            order = self._order(epoch)
            kept = kept_lengths(self.index[order], self.window, self.marks)
            rows: list[list[int]] = [[]]
            used = 0
            for example, targets in zip(order.tolist(), (kept - 1).tolist()):
                if used + targets > self.block_size and rows[-1]:
                    rows.append([])
                    used = 0
                rows[-1].append(example)
                used += targets
            self._plans[epoch] = rows
        return self._plans[epoch]

    def _row(self, position: int) -> list[int]:
        """The examples of global row `position` (rows of all epochs, one after another)."""
        epoch = 0
        while True:
            if epoch == len(self._rows_in_epoch):
                self._rows_in_epoch.append(len(self._plan(epoch)))
            if position < self._rows_in_epoch[epoch]:
                return self._plan(epoch)[position]
            position -= self._rows_in_epoch[epoch]
            epoch += 1

    def _step_rows(self, step: int, micro: int) -> list[list[int]]:
        rows = self.batch_size * self.world_size
        first = (step * self.accum + micro) * rows
        return [self._row(p) for p in range(first, first + rows)]

    def counted(self, step: int) -> int:
        ids = [i for m in range(self.accum) for row in self._step_rows(step, m) for i in row]
        return int(self._counted(self.index[ids]).sum())

    def get(self, step: int, micro: int = 0) -> Batch:
        rows = self._step_rows(step, micro)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        parts = [self._rows(self.index[row]) for row in rows]
        lengths = [[int(n) - 1 for n in kept_lengths(self.index[row], self.window, self.marks)] for row in rows]
        width = max(sum(row) for row in lengths)
        x = torch.zeros((len(rows), width), dtype=torch.int64)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
        segments = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, ((px, py), row_lengths) in enumerate(zip(parts, lengths)):
            at = 0
            for k, n in enumerate(row_lengths):
                x[r, at : at + n], y[r, at : at + n] = px[k, :n], py[k, :n]
                segments[r, at : at + n] = k + 1
                at += n
        return Batch(x, y, segments)

    def epoch_rows(self) -> int:
        return len(self._plan(0))


def eval_examples(tokens: np.ndarray, index: np.ndarray, block_size: int, batch_size: int, max_batches: int,
                  mask_prompt: bool, marks: np.ndarray | None = None):
    """Evenly spaced validation examples, batched in order: the same for every evaluation."""
    if len(index) == 0:
        raise DataError("the val split holds no examples; one evaluation needs at least one")
    count = min(len(index), batch_size * max_batches)
    ids = np.linspace(0, len(index) - 1, count).round().astype(np.int64) if count > 1 else np.zeros(1, np.int64)
    return [example_rows(tokens, index[ids[i : i + batch_size]], block_size + 1, mask_prompt, marks)
            for i in range(0, count, batch_size)]
