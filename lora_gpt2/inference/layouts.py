"""Decode-time weight layouts: oneDNN's blocked copy of each linear weight, installed on a model
for as long as a decoding session runs, and removed with nothing left behind.

Decoding multiplies a few rows by each weight, and PyTorch's general matmul re-blocks the weight
on every such call; a blocked copy made once avoids that (the README's decode section has the
figures). An adapted layer's copy holds its merged weight (W + s·B·A for LoRA, what `merge`
would write for any variant), so a token costs one product per layer, not three, and no memory
beyond the copy that is made anyway.

Installing swaps the forward of each linear module for one that reads the copy, and the copy is
read only while everything it was made from is unchanged: the module's tensors (their version
counters), and an adapter's active / merged state. Anything else (gradients on, another device
or dtype, an adapter changed in place, merged or disabled) takes the module's own forward, so
training and evaluation never see a copy. Where oneDNN cannot block a weight (another device, a
dtype this CPU cannot block, a build without it) the module keeps its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.lora import AdapterLayer, FrozenLinear


def block(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout of a (out, in) weight, for products with any number of rows, or None."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
    except RuntimeError:  # e.g. bfloat16 on a CPU without AVX-512 or AVX-NE-CONVERT
        return None


# oneDNN keeps memory for every input shape its blocked linear meets, and prompts bring ever new
# lengths, so the blocked copy sees a bounded set of row counts: a decoding step's (one row per
# sequence, at most the batch), and a short prefill's rounded up to a multiple of ROW_BUCKET with
# zero rows (each output row depends on its input row alone). Longer prefills are bound by
# compute, not by reading the weight, and take the plain weight.
ROW_BUCKET = 32
BLOCKED_ROWS = 256


def blocked_rows(x: torch.Tensor) -> int | None:
    """How many rows `x` goes to the blocked copy with (0: as it is), or None for the plain weight."""
    if x.dim() == 3 and x.size(1) == 1:
        return 0  # a decoding step
    rows = x.numel() // x.size(-1)
    if rows > BLOCKED_ROWS:
        return None
    return -(-rows // ROW_BUCKET) * ROW_BUCKET


def blocked_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) from the weight's blocked copy."""
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


@dataclass(eq=False)
class _Copy:
    """A module's blocked copy and what it was made from: its tensors' versions, and an adapter's
    switches (read on every call, so the tensors are listed once, not walked each time)."""

    module: FrozenLinear
    blocked: torch.Tensor
    tensors: tuple[torch.Tensor, ...]
    made_from: tuple

    @classmethod
    def of(cls, module: FrozenLinear, blocked: torch.Tensor) -> "_Copy":
        copy = cls(module, blocked, tuple(module.parameters()), ())
        copy.made_from = copy.state()
        return copy

    def state(self) -> tuple:
        switches = (self.module.active, self.module.merged) if isinstance(self.module, AdapterLayer) else ()
        return tuple(t._version for t in self.tensors) + switches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = blocked_rows(x)
        if (rows is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == self.blocked.dtype and self.state() == self.made_from):
            if not rows:
                return blocked_linear(x, self.blocked, self.module.bias)
            flat = x.reshape(-1, x.size(-1))
            padded = torch.cat([flat, flat.new_zeros(rows - flat.size(0), flat.size(1))]) if rows > flat.size(0) else flat
            out = blocked_linear(padded, self.blocked, self.module.bias)[: flat.size(0)]
            return out.reshape(*x.shape[:-1], out.size(-1))
        return type(self.module).forward(self.module, x)


class DecodeLayout:
    """Blocked copies of a model's linear weights while decoding (a context manager, or
    `install` / `remove`): the model's modules are left as they were found."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.copies: dict[nn.Module, _Copy] = {}

    def install(self) -> int:
        """Block every linear weight that can be; returns how many were."""
        self.remove()
        for module in self.model.modules():
            if not isinstance(module, FrozenLinear):
                continue
            with torch.no_grad():
                adapted = isinstance(module, AdapterLayer) and module.active and not module.merged
                blocked = block(module.merged_weight() if adapted else module.weight)
            if blocked is None:
                continue
            copy = _Copy.of(module, blocked)
            module.forward = copy.forward  # an instance attribute: `remove` deletes it
            self.copies[module] = copy
        return len(self.copies)

    def remove(self) -> None:
        for module in self.copies:
            del module.forward
        self.copies.clear()

    def __enter__(self) -> "DecodeLayout":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
