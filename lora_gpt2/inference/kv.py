"""Where a decoding batch keeps its keys and values: the layouts `Decoder` can run on.

A layout keeps each sequence's cache after its prefill (`keep`), hands the model one step's
caches for the running rows (`step`: the model's `StepCache`), and frees a sequence's memory when
it ends (`release`). Two are registered in LAYOUTS:

- "paged" (the default): one pool of fixed-size blocks per layer, shared by the batch, and a
  block table per sequence, as vLLM's PagedAttention. Memory grows a block at a time with the
  tokens the sequences hold, and a step's attention is one call per layer for the batch: each
  row's blocks are gathered into one buffer and attended to under a mask of its length (on a
  CPU, in chunks of rows whose keys fit GATHER_BYTES).
- "rows": a cache of its own per sequence, reserved for its prompt and every token it may get,
  and one attention call per row and layer (the layout before paging). PyTorch has no CPU kernel
  that reads blocks in place, so the paged gather copies every cached key once per step: with a
  few hundred cached positions per row this layout decodes faster on a CPU (the README's Benchmark
  section has the figures), at the cost of reserving memory for tokens that may never come.

Both give every row exactly its own attention: a row never sees another's keys, and masked
positions hold finite numbers (a block is zeroed when it is handed out), so a sequence whose
adapter overflowed cannot leak NaN into the next owner of its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model.gpt2 import GPT2, KVCache, LayerKV

# On a CPU, a step's rows are gathered and attended to in chunks whose keys and values fit in
# GATHER_BYTES, so the attention reads them from cache rather than memory: 16 rows of up to
# ~170 positions on GPT-2 small are one call; at 400 positions, 8 MB chunks made a 16-row step
# 8% faster than one call over everything (the README's Benchmark section has the figures).
GATHER_BYTES = 8 << 20
BLOCK_SIZE = 16  # positions per block (vLLM's default): at most 15 reserved positions per sequence


class RowCaches:
    """One KVCache per sequence (`sequence.cache`), each attended to in its own call."""

    name = "rows"

    def __init__(self, model: GPT2) -> None:
        self.config, self.dtype = model.config, model.frozen_dtype()
        self.device = model.token_embedding.weight.device
        self.held: set = set()
        self.nbytes = self.peak_bytes = 0  # what the held caches take, now and at most

    def reserve(self, positions: list[int]) -> None:
        """Sequences holding these many positions are about to join (nothing to do: each has its own)."""

    def prefill_room(self, group_size: int, width: int, room: int) -> int:
        """Positions of the prefill's shared cache: a sequence prefilled alone keeps it as its own."""
        return room if group_size == 1 else width

    def keep(self, sequence, shared: KVCache, row: int, n: int, room: int) -> None:
        """After a prefill: the sequence's first n positions are row `row` of `shared`."""
        if shared.keys[0].size(0) == 1 and shared.room >= room and all(s.cache is not shared for s in self.held):
            sequence.cache = shared
        else:
            sequence.cache = KVCache.empty(self.config, 1, self.dtype, self.device, room)
            for mine, ours in zip(sequence.cache.keys + sequence.cache.values, shared.keys + shared.values):
                mine[:, :, :n] = ours[row : row + 1, :, :n]
        sequence.cache.length = n
        self.held.add(sequence)
        self.nbytes += _bytes(sequence.cache)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def full(self, sequence) -> bool:
        return sequence.cache.length == sequence.cache.room

    def release(self, sequence) -> None:
        if sequence in self.held:
            self.held.discard(sequence)
            self.nbytes -= _bytes(sequence.cache)
        sequence.cache = None

    def step(self, sequences: list) -> "_RowsStep":
        return _RowsStep([s.cache for s in sequences], self.device)

    @property
    def tokens(self) -> int:
        # /metrics reads this from another thread: each cache is read once, as a sequence may end meanwhile
        return sum(c.length for c in [s.cache for s in list(self.held)] if c is not None)

    blocks_in_use = blocks = 0

    def describe(self) -> dict:
        return {"layout": self.name, "tokens": self.tokens, "bytes": self.nbytes, "peak_bytes": self.peak_bytes}


def _bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.keys + cache.values)


@dataclass
class _RowsStep:
    caches: list[KVCache]
    device: torch.device
    positions: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.positions = torch.tensor([[c.length] for c in self.caches], device=self.device)  # (B, 1)

    def layer(self, i: int) -> "_RowsLayer":
        return _RowsLayer([c.layer(i) for c in self.caches])

    def advance(self) -> None:
        for c in self.caches:
            c.length += 1


@dataclass
class _RowsLayer:
    rows: list[LayerKV]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([row.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i, row in enumerate(self.rows)])


@dataclass(eq=False)
class Blocks:
    """A sequence's block table: its positions p live in block ids[p // block_size]."""

    ids: list[int]
    length: int = 0


class PagedCache:
    """Every layer's keys and values in one pool of blocks, (blocks, block_size · C) per layer,
    shared by the batch; `sequence.cache` is the sequence's `Blocks`."""

    name = "paged"

    def __init__(self, model: GPT2, block_size: int = BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self.config, self.dtype = model.config, model.frozen_dtype()
        self.device = model.token_embedding.weight.device
        self.block_size = block_size
        self.width = model.config.n_embd  # C = n_head · head_size: one position of one layer's keys
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.free: list[int] = []
        self.blocks = 0  # blocks in the pool
        self.peak_blocks = 0  # the most ever handed out at once
        self.peak_bytes = 0  # the largest pool
        self.tokens = 0  # positions the sequences hold
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's buffers, reused

    @property
    def blocks_in_use(self) -> int:
        return self.blocks - len(self.free)

    def describe(self) -> dict:
        return {"layout": self.name, "tokens": self.tokens, "bytes": self.nbytes, "block_size": self.block_size,
                "blocks_in_use": self.blocks_in_use, "blocks": self.blocks, "peak_blocks": self.peak_blocks,
                "peak_bytes": self.peak_bytes}

    @property
    def nbytes(self) -> int:
        """Memory of the pool: what the cached keys and values take, blocks in use or free."""
        return 2 * self.config.n_layer * self.blocks * self.block_size * self.width * self.dtype.itemsize

    def reserve(self, positions: list[int]) -> None:
        """Grow the pool once for sequences about to join, holding these many positions each (and
        their first token), rather than once per sequence."""
        need = sum(p // self.block_size + 1 for p in positions)
        if need > len(self.free):
            self._grow(self.blocks + need - len(self.free))

    def prefill_room(self, group_size: int, width: int, room: int) -> int:
        return width  # the prefill's cache is copied into blocks, whatever the group

    def keep(self, sequence, shared: KVCache, row: int, n: int, room: int) -> None:
        blocks = Blocks(self._take(-(-n // self.block_size)), n)
        nh = self.config.n_head
        for start, end, first in self._runs(blocks):  # one strided copy per run of consecutive blocks
            for pools, cached in ((self.keys, shared.keys), (self.values, shared.values)):
                for pool, layer in zip(pools, cached):  # (nh, n, hs) -> positions x (nh, hs), as the pool holds them
                    rows = pool.view(-1, nh, self.width // nh)[first : first + end - start]
                    rows.copy_(layer[row, :, start:end].transpose(0, 1))
        sequence.cache = blocks
        self.tokens += n

    def _runs(self, blocks: Blocks):
        """(first position, end position, first pool row) of each run of consecutive block ids."""
        bs, ids, start = self.block_size, blocks.ids, 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                yield start * bs, min(i * bs, blocks.length), ids[start] * bs
                start = i

    def full(self, sequence) -> bool:
        return sequence.cache.length == self.config.n_positions

    def release(self, sequence) -> None:
        blocks = sequence.cache
        sequence.cache = None
        if isinstance(blocks, Blocks):
            self.free.extend(reversed(blocks.ids))  # handed out again in the same order: see _PagedStep.alone
            self.tokens -= blocks.length
            blocks.ids = []
        if not self.blocks_in_use:  # idle: the pool and the buffers go back to the allocator
            self.keys, self.values, self.free, self.blocks, self._gathered = [], [], [], 0, None

    def step(self, sequences: list) -> "_PagedStep":
        tables = [s.cache for s in sequences]
        short = [t for t in tables if t.length == len(t.ids) * self.block_size]  # the new token needs a block
        if short:
            for table, block in zip(short, self._take(len(short))):
                table.ids.append(block)
        return _PagedStep(self, tables)

    def _take(self, n: int) -> list[int]:
        """n blocks, zeroed (see the module's note), growing the pool when it is short."""
        if len(self.free) < n:  # by a quarter at least: a growth copies the pool, so it must be rare
            self._grow(max(self.blocks + n - len(self.free), self.blocks * 5 // 4, 16))
        taken = [self.free.pop() for _ in range(n)]
        index = torch.tensor(taken, device=self.device)
        for pool in self.keys + self.values:
            pool.index_fill_(0, index, 0)
        self.peak_blocks = max(self.peak_blocks, self.blocks_in_use)
        return taken

    def _grow(self, blocks: int) -> None:
        """A pool of `blocks` blocks, holding what the old one held, one layer at a time (so the
        old and the new pool are never both whole in memory)."""
        shape = (blocks, self.block_size * self.width)
        for pools in (self.keys, self.values):
            for i in range(self.config.n_layer):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(pools):
                    new[: pools[i].size(0)] = pools[i]
                    pools[i] = new
                else:
                    pools.append(new)
        self.free.extend(range(blocks - 1, self.blocks - 1, -1))  # pop() hands out the lowest first
        self.blocks = blocks
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def buffers(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for `blocks` gathered blocks of keys and of values, shared by every layer of a step."""
        if self._gathered is None or self._gathered[0].size(0) < blocks:
            shape = (blocks, self.block_size * self.width)
            self._gathered = (torch.empty(shape, dtype=self.dtype, device=self.device),
                              torch.empty(shape, dtype=self.dtype, device=self.device))
        return self._gathered[0][:blocks], self._gathered[1][:blocks]


class _PagedStep:
    """One decoding step over the pool: where each row's new token goes, which blocks each row
    reads (its table, padded with its first block to the longest), and the mask of its length."""

    def __init__(self, cache: PagedCache, tables: list[Blocks]) -> None:
        device, bs = cache.device, cache.block_size
        self.cache, self.tables = cache, tables
        lengths = torch.tensor([t.length for t in tables])
        last = torch.tensor([t.ids[t.length // bs] for t in tables])
        self.slots = (last * bs + lengths % bs).to(device)  # (B,) rows of the (blocks · bs, C) view
        widest = max(len(t.ids) for t in tables)
        self.index = torch.tensor([t.ids + t.ids[:1] * (widest - len(t.ids)) for t in tables], device=device).view(-1)
        self.positions = lengths[:, None].to(device)  # (B, 1): the new token's position
        self.mask = (torch.arange(widest * bs, device=device)[None] <= self.positions)[:, None, None]  # (B, 1, 1, L)
        # one row whose blocks follow each other in the pool (`generate`'s one sequence: blocks are
        # handed out lowest first) reads them in place, as the per-row layout does: no gather, no mask
        only = tables[0] if len(tables) == 1 else None
        consecutive = only is not None and only.ids == list(range(only.ids[0], only.ids[0] + len(only.ids)))
        self.alone = (only.ids[0] * bs, only.length + 1) if consecutive else None  # (first pool row, positions)
        row_bytes = 2 * widest * bs * cache.width * cache.dtype.itemsize
        self.chunk = max(1, GATHER_BYTES // row_bytes) if device.type == "cpu" else len(tables)

    def layer(self, i: int) -> "_PagedLayer":
        return _PagedLayer(self, self.cache.keys[i], self.cache.values[i])

    def advance(self) -> None:
        for t in self.tables:
            t.length += 1
        self.cache.tokens += len(self.tables)


@dataclass
class _PagedLayer:
    step: _PagedStep
    keys: torch.Tensor  # (blocks, block_size · C)
    values: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, nh, _, hs = q.shape
        step, width = self.step, nh * hs
        self.keys.view(-1, width).index_copy_(0, step.slots, k.transpose(1, 2).reshape(B, width))
        self.values.view(-1, width).index_copy_(0, step.slots, v.transpose(1, 2).reshape(B, width))
        if step.alone is not None:
            first, n = step.alone
            keys = self.keys.view(-1, width)[first : first + n].view(1, n, nh, hs).transpose(1, 2)
            values = self.values.view(-1, width)[first : first + n].view(1, n, nh, hs).transpose(1, 2)
            return F.scaled_dot_product_attention(q, keys, values)
        per_row = step.index.numel() // B
        out = []
        for first in range(0, B, step.chunk):
            rows = slice(first, min(B, first + step.chunk))
            n = rows.stop - rows.start
            keys, values = step.cache.buffers(n * per_row)
            index = step.index[rows.start * per_row : rows.stop * per_row]
            torch.index_select(self.keys, 0, index, out=keys)
            torch.index_select(self.values, 0, index, out=values)
            keys = keys.view(n, -1, nh, hs).transpose(1, 2)  # (n, nh, L, hs), position-major in memory
            values = values.view(n, -1, nh, hs).transpose(1, 2)
            out.append(F.scaled_dot_product_attention(q[rows], keys, values, attn_mask=step.mask[rows]))
        return out[0] if len(out) == 1 else torch.cat(out)


LAYOUTS = {"paged": PagedCache, "rows": RowCaches}


def layout(name: str, model: GPT2):
    if name not in LAYOUTS:
        raise ValueError(f"unknown KV cache layout {name!r}; choose one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[name](model)
