"""Data: what a `--data` value holds (formats), its prepared token files (prepare), and the
batches training and evaluation read (batches). Formats are a table of small classes; after
preparation everything sees only tokens, example rows and counted targets.

The names below load their module on first use, so reading a config (which needs only
`formats`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "Example": "formats", "Options": "formats", "Source": "formats", "located": "formats", "resolve": "formats",
    "Prepared": "prepare", "cache_dir": "prepare", "ensure_prepared": "prepare",
    "IGNORE": "batches", "Batch": "batches", "ExampleBatches": "batches", "PackedBatches": "batches", "TrainBatches": "batches", "counted_targets": "batches",
    "eval_examples": "batches", "eval_windows": "batches", "example_rows": "batches", "open_index": "batches",
    "open_tokens": "batches",
}
__all__ = sorted([*_WHERE, "eval_batches", "mask_prompt_for", "train_batches"])

if TYPE_CHECKING:
    from .batches import IGNORE, Batch, ExampleBatches, PackedBatches, TrainBatches, counted_targets, eval_examples, eval_windows, example_rows, open_index, open_tokens
    from .formats import Example, Options, Source, located, resolve
    from .prepare import Prepared, cache_dir, ensure_prepared


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mask_prompt_for(prepared: Prepared, mask_prompt: bool | None, train_on: str | None = None) -> bool:
    """Whether the loss counts only part of each example: the completion (--mask-prompt, on by
    default for prompt/completion data) or the assistant's turns (--train-on assistant, the
    default for chat data). Each flag means nothing for other data."""
    if prepared.chat:
        from .formats import TRAIN_ON

        if train_on is not None and train_on not in TRAIN_ON:
            raise ValueError(f"--train-on must be one of {', '.join(TRAIN_ON)}; got {train_on!r}")
        if mask_prompt is not None:
            raise ValueError(f"--mask-prompt is for prompt/completion data; {prepared.source.path} is chat data: "
                             "use --train-on assistant or all")
        return train_on != "all"
    if train_on is not None:
        raise ValueError(f"--train-on is for chat data; {prepared.source.path} is {prepared.kind} data")
    prompted = prepared.kind == "prompt/completion"
    if mask_prompt and not prompted:
        raise ValueError(f"--mask-prompt needs prompt/completion data; {prepared.source.path} is {prepared.kind} data")
    return prompted if mask_prompt is None else mask_prompt


def _marks(prepared: Prepared, split: str):
    import numpy as np

    path = prepared.mask_path(split)
    return np.memmap(path, dtype=np.uint8, mode="r") if prepared.chat and path.stat().st_size else None


def train_batches(prepared: Prepared, *, batch_size: int, block_size: int, seed: int, mask_prompt: bool,
                  rank: int = 0, world_size: int = 1, accum: int = 1, packing: bool = False):
    """The training draws for a prepared source: windows of a stream, or whole examples (one
    per row, padded; or `packing` several per row)."""
    from . import batches as b

    tokens = b.open_tokens(prepared.train)
    if prepared.layout == "stream":
        return b.TrainBatches(tokens, batch_size, block_size, seed, rank, world_size, accum)
    kind = b.PackedBatches if packing else b.ExampleBatches
    return kind(tokens, b.open_index(prepared.index_path("train")), batch_size, block_size, seed,
                mask_prompt, rank, world_size, accum, _marks(prepared, "train"))


def eval_batches(prepared: Prepared, *, block_size: int, batch_size: int, max_batches: int, mask_prompt: bool,
                 split: str = "val") -> list:
    """The fixed evaluation batches of a split: the same for every evaluation and for `eval`."""
    from . import batches as b

    tokens = b.open_tokens(prepared.tokens_path(split))
    if prepared.layout == "stream":
        return b.eval_windows(tokens, block_size, batch_size, max_batches, split)
    return b.eval_examples(tokens, b.open_index(prepared.index_path(split)), block_size, batch_size, max_batches,
                           mask_prompt, _marks(prepared, split))
