"""Many adapters over one base model, batched: row i of a batch adds adapter i's update.

The base model carries no LoRA layers of its own. For every module some adapter targets, the
bank stacks the adapters' tensors, zero-padded to the largest rank (zero rows of A and zero
columns of B add nothing, exactly), with row 0 of each stack the base model's zero update. A
forward under `bank.rows([...])` then gathers each row's A and B and adds its low-rank product,
as Punica and S-LoRA do: one batched forward serves requests for different adapters.

A variant whose update is not added per row (variants.py: `unbatchable`, e.g. DoRA) is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..adapters import lora, variants
from ..checkpoints.reading import Adapter, check_base_layers
from ..config import LoRAConfig
from ..errors import CheckpointError
from ..model.gpt2 import GPT2


@dataclass(frozen=True)
class _Rows:
    """Which adapter each row of the next forward uses: indices into the stacks, and as a key."""

    index: torch.Tensor  # (B,)
    key: tuple[int, ...]


@dataclass
class _Stack:
    """One module's adapters: a (n, r, in), b (n, out, r), scaling (n,); row 0 adds nothing."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: torch.Tensor
    # the last rows' gathered (a, b, scaling): decoding steps repeat one batch's rows until a
    # request joins or leaves, so each module gathers once per change, not once per step
    gathered: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    users: set[int] = field(default_factory=set)  # the slots whose adapter has an update here

    def rows(self, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.gathered is None or self.gathered[0] != rows.key:
            self.gathered = (rows.key, self.a[rows.index], self.b[rows.index], self.scaling[rows.index])
        return self.gathered[1:]

    def shrink(self, n: int) -> None:
        """Drop the rows from n on (free slots at the end)."""
        if self.a.size(0) > n:
            self.a, self.b, self.scaling = self.a[:n].clone(), self.b[:n].clone(), self.scaling[:n].clone()
            self.gathered = None

    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write slot's update (None: none), growing the stack to hold the slot and the rank."""
        n, r, fan_in = self.a.shape
        rank = r if a is None else max(r, a.size(0))
        if rank > r:  # pad every adapter so far to the new largest rank
            self.a = torch.cat([self.a, self.a.new_zeros(n, rank - r, fan_in)], dim=1)
            self.b = torch.cat([self.b, self.b.new_zeros(n, self.b.size(1), rank - r)], dim=2)
        if slot >= n:
            more = slot + 1 - n
            self.a = torch.cat([self.a, self.a.new_zeros(more, rank, fan_in)])
            self.b = torch.cat([self.b, self.b.new_zeros(more, self.b.size(1), rank)])
            self.scaling = torch.cat([self.scaling, self.scaling.new_zeros(more)])
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.scaling[slot] = 0.0
        if a is not None:
            self.a[slot, : a.size(0)] = a
            self.b[slot, :, : b.size(1)] = b
            self.scaling[slot] = scaling
            self.users.add(slot)
        else:
            self.users.discard(slot)
        self.gathered = None


class AdapterBank:
    """Adapters by name over `model` (built without LoRA targets); `rows` says which one each
    row of the next forward uses (None: the base model).

    Each adapter holds one slot (a row of every stack); `remove` frees it for the next `add`,
    so loading and unloading adapters at run time reuses memory instead of growing it. A
    module's stack and hook go when no adapter adapts it any more."""

    def __init__(self, model: GPT2) -> None:
        if model.lora_layers():
            raise ValueError("an adapter bank needs the base model without LoRA layers (targets=())")
        self.model = model
        self.names: list[str | None] = [None]
        self.stacks: dict[str, _Stack] = {}
        self._rows: _Rows | None = None
        self._hooks: dict[str, object] = {}  # one forward hook per stacked module (see _stack_for)
        self._dtype = model.frozen_dtype()
        self._device = model.token_embedding.weight.device

    def __contains__(self, name: str) -> bool:
        return name is not None and name in self.names

    @property
    def loaded(self) -> list[str]:
        return [n for n in self.names if n is not None]

    @property
    def nbytes(self) -> int:
        """Memory the adapters take: every stack's A, B and scalings (row 0, the base, included)."""
        stacks = list(self.stacks.values())  # a snapshot: /metrics reads this while adapters load
        return sum(t.numel() * t.element_size() for st in stacks for t in (st.a, st.b, st.scaling))

    def add(self, name: str, config: LoRAConfig, tensors: dict[str, torch.Tensor], source: str = "") -> None:
        """Add an adapter: its LoRA settings and tensors, named as `lora_parameters` names them."""
        where = source or name
        if name in self.names:
            raise ValueError(f"adapter name {name!r} is given twice")
        row = variants.variant(config.variant)
        if row.unbatchable:
            raise CheckpointError(f"{where} is a {row.name} adapter: {row.unbatchable}")
        with torch.device("meta"):  # the layers this adapter has: what tensors each holds, of what shape
            layers = lora.adapter_layers(GPT2(self.model.config, config))
        expected = {f"{path}.{local}": tuple(t.shape) for path, layer in layers.items()
                    for local, t in layer.saved_params().items()}
        got = {k: tuple(t.shape) for k, t in tensors.items()}
        if got != expected:
            wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
            raise CheckpointError(f"{where} does not fit {self.model.base.source if self.model.base else 'the model'}"
                                  f": tensor {wrong[0]} is missing, unexpected or of another shape")
        modules = dict(self.model.named_modules())
        slot = next((i for i, n in enumerate(self.names) if i and n is None), len(self.names))
        for path in sorted(set(layers) | set(self.stacks)):
            if path not in self.stacks:
                self._stack_for(path, modules[path])
            if path in layers:  # a batchable variant saves its update as lora_a, lora_b alone
                a, b = (tensors[f"{path}.{local}"].to(self._device, self._dtype) for local in ("lora_a", "lora_b"))
                self.stacks[path].put(slot, a, b, config.scaling)
            else:
                self.stacks[path].put(slot, None, None, 0.0)
        if slot == len(self.names):
            self.names.append(name)
        else:
            self.names[slot] = name

    def remove(self, name: str) -> None:
        """Take an adapter out; its slot is free for the next `add`. No row may still use it."""
        if name not in self:
            raise ValueError(f"unknown adapter {name!r}")
        slot = self.names.index(name)
        for path, stack in list(self.stacks.items()):
            stack.put(slot, None, None, 0.0)
            if not stack.users:  # nobody adapts this module any more: no hook, no work per forward
                self._hooks.pop(path).remove()
                del self.stacks[path]
        self.names[slot] = None
        while len(self.names) > 1 and self.names[-1] is None:  # trailing free slots: give them back
            self.names.pop()
        for stack in self.stacks.values():
            stack.shrink(len(self.names))

    def add_adapter(self, name: str, adapter: Adapter, force: bool = False) -> None:
        """Add an adapter read from disk (`adapters.read_adapter`: a run, an adapter or a PEFT
        folder), checked against the base model as `generate` checks it."""
        expected, actual = adapter.base_fingerprint, self.model.fingerprint
        if expected and actual and expected != actual and not force:
            raise CheckpointError(f"adapter {adapter.path} was trained on base {adapter.base_model!r} (fingerprint "
                                  f"{expected}), but the served model has fingerprint {actual}")
        check_base_layers(self.model, adapter)
        self.add(name, adapter.lora, adapter.tensors, source=str(adapter.path))

    def _stack_for(self, path: str, module: torch.nn.Module) -> None:
        n = len(self.names)
        if isinstance(module, lora.FrozenLinear):
            fan_in, fan_out = module.in_features, module.out_features
        else:
            fan_in, fan_out = module.num_embeddings, module.embedding_dim
        self.stacks[path] = _Stack(torch.zeros(n, 1, fan_in, dtype=self._dtype, device=self._device),
                                   torch.zeros(n, fan_out, 1, dtype=self._dtype, device=self._device),
                                   torch.zeros(n, dtype=self._dtype, device=self._device))
        kind = _linear_update if isinstance(module, lora.FrozenLinear) else _embedding_update
        stack = self.stacks[path]

        def add_rows(_module, args, out):  # a forward hook: the base output plus each row's update
            update = kind(stack, self._rows, args[0])
            return None if update is None else out + update

        self._hooks[path] = module.register_forward_hook(add_rows)

    def close(self) -> None:
        """Take the bank's hooks off the model: it is the plain base model again."""
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        self.stacks.clear()
        self.names = [None]

    def __enter__(self) -> "AdapterBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Within the block, row i of a forward uses adapter names[i] (None: the base model)."""
        unknown = [n for n in names if n is not None and n not in self]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}; loaded: {', '.join(self.loaded)}")
        key = tuple(self.names.index(n) for n in names)
        # every row the base model: no update to add anywhere
        self._rows = _Rows(torch.tensor(key, device=self._device), key) if any(key) else None
        try:
            yield
        finally:
            self._rows = None


def _linear_update(stack: _Stack, rows: _Rows | None, x: torch.Tensor) -> torch.Tensor | None:
    """Row i's scaling * x_i A_i^T B_i^T, for x (B, T, in)."""
    if rows is None:
        return None
    a, b, scaling = (t.to(x.dtype) for t in stack.rows(rows))  # (B, r, in), (B, out, r), (B,)
    low = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
    return torch.bmm(low, b.transpose(1, 2)) * scaling[:, None, None]


def _embedding_update(stack: _Stack, rows: _Rows | None, ids: torch.Tensor) -> torch.Tensor | None:
    """Row i's scaling * A_i^T[ids_i] B_i^T, for ids (B, T), or positions (T,) shared by every row."""
    if rows is None:
        return None
    if ids.dim() == 1:
        ids = ids.expand(rows.index.numel(), -1)
    low = stack.a[rows.index[:, None], :, ids]  # (B, T, r): column ids[i, t] of A_i
    _, b, scaling = stack.rows(rows)
    return torch.bmm(low, b.transpose(1, 2)) * scaling[:, None, None]
