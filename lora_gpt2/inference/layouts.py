"""Decode-time weight layouts: a copy of each linear weight in the format decoding reads fastest,
installed on a model for as long as a decoding session runs, and removed with nothing left behind.

Decoding multiplies a few rows by each weight, and PyTorch's general matmul re-blocks the weight
on every such call; oneDNN's blocked copy made once avoids that (`Blocked`, the default; the
README's decode section has the figures). `--quantize int8` keeps the copy as int8 instead
(quantize.py), which reads a quarter of the bytes. An adapted layer's copy holds its merged
weight (W + s·B·A for LoRA, what `merge` would write for any variant), so a token costs one
product per layer, not three, and no memory beyond the copy that is made anyway.

Installing swaps the forward of each linear module for one that reads the copy, and the copy is
read only while everything it was made from is unchanged: the module's tensors (their version
counters), and an adapter's active / merged state. Anything else (gradients on, an adapter
changed in place, merged or disabled, an input the format does not take) goes to the module's
own forward, so training never sees a copy. Where a format cannot copy a weight (oneDNN on
another device, a dtype this CPU cannot block) the module keeps its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
import torch.nn.functional as F

from ..adapters.lora import AdapterLayer, FrozenLinear, LowRankTerms
from . import quantize


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


class WeightFormat(Protocol):
    """How a decoding session keeps and multiplies one linear weight (a row of FORMATS)."""

    name: str  # what --quantize calls it
    folds: bool  # whether an adapted layer's update goes into its copy by default

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError, in one line, where this format cannot run."""

    def pack(self, weight: torch.Tensor) -> object | None:
        """The copy of a (out, in) weight, or None: the module keeps its own forward."""

    def linear(self, x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x · Wᵀ + b from the copy, or None: this input takes the module's own forward."""


class Blocked:
    """The float format: oneDNN's blocked copy, for the few rows of decoding and short prefills."""

    name = "none"
    folds = True  # an adapted layer's copy holds W + s·B·A

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        pass  # where oneDNN cannot block a weight, the module keeps its own forward

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        return block(weight)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        rows = blocked_rows(x)
        if rows is None or x.device.type != "cpu" or x.dtype != packed.dtype:
            return None
        if not rows:
            return blocked_linear(x, packed, bias)
        flat = x.reshape(-1, x.size(-1))
        padded = torch.cat([flat, flat.new_zeros(rows - flat.size(0), flat.size(1))]) if rows > flat.size(0) else flat
        out = blocked_linear(padded, packed, bias)[: flat.size(0)]
        return out.reshape(*x.shape[:-1], out.size(-1))


# --quantize's choices: a new weight format is one WeightFormat class and a row here
FORMATS: dict[str, WeightFormat] = {"none": Blocked(), "int8": quantize.Int8()}


def weight_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise ValueError(f"--quantize must be one of {', '.join(FORMATS)}; got {name!r}")
    return FORMATS[name]


@dataclass(eq=False)
class _Copy:
    """A module's decode-time copy and what it was made from: its tensors' versions, and an
    adapter's switches (read on every call, so the tensors are listed once, not walked each time).
    `update`: an adapter's low-rank terms applied beside an unfolded copy, or None."""

    module: FrozenLinear
    format: WeightFormat
    packed: object
    tensors: tuple[torch.Tensor, ...]
    made_from: tuple
    update: LowRankTerms | None = None

    @classmethod
    def of(cls, module: FrozenLinear, format: WeightFormat, packed, update: LowRankTerms | None = None) -> "_Copy":
        copy = cls(module, format, packed, tuple(module.parameters()), (), update)
        copy.made_from = copy.state()
        return copy

    def state(self) -> tuple:
        switches = (self.module.active, self.module.merged) if isinstance(self.module, AdapterLayer) else ()
        return tuple(t._version for t in self.tensors) + switches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.state() == self.made_from:
            out = self.format.linear(x, self.packed, self.module.bias)
            if out is not None:
                u = self.update
                if u is not None:
                    out = out + F.linear(F.linear(x, u.lora_a.to(x.dtype)), u.lora_b.to(x.dtype)) * u.scaling
                return out
        return type(self.module).forward(self.module, x)


class DecodeLayout:
    """Decode-time copies of a model's linear weights (a context manager, or `install` /
    `remove`): the model's modules are left as they were found. `quantize` names the copies'
    format (FORMATS); `fold`: an adapted layer's update goes into its copy (one product) where the
    format folds, else it is applied in float beside a copy of the frozen weight."""

    def __init__(self, model: nn.Module, quantize: str = "none", fold: bool | None = None) -> None:
        self.model = model
        self.format = weight_format(quantize)
        self.fold = self.format.folds if fold is None else fold
        self.copies: dict[nn.Module, _Copy] = {}

    def install(self) -> int:
        """Copy every linear weight that can be; returns how many were. A format that cannot run on
        the model's device and dtype is refused (ValueError) before anything is copied."""
        self.remove()
        first = next(self.model.parameters())
        self.format.check(first.device, self.model.frozen_dtype() if hasattr(self.model, "frozen_dtype")
                          else first.dtype)
        for module in self.model.modules():
            if not isinstance(module, FrozenLinear):
                continue
            with torch.no_grad():
                adapted = isinstance(module, AdapterLayer) and module.active and not module.merged
                terms = module.low_rank_terms() if adapted and not self.fold else None
                unfolded = terms is not None and terms.lora_a is not None
                packed = self.format.pack(module.merged_weight() if adapted and not unfolded else module.weight)
            if packed is None:
                continue
            copy = _Copy.of(module, self.format, packed, terms if unfolded else None)
            module.forward = copy.forward  # an instance attribute: `remove` deletes it
            self.copies[module] = copy
        return len(self.copies)

    def describe(self) -> dict:
        """The copies' format, how many layers have one, and their bytes (what /health shows)."""
        def nbytes(packed) -> int:
            if isinstance(packed, torch.Tensor):  # oneDNN's blocked tensors do not say: their element count
                return packed.numel() * packed.element_size()
            return packed.nbytes
        return {"format": self.format.name, "layers": len(self.copies),
                "bytes": sum(nbytes(c.packed) for c in self.copies.values())}

    def remove(self) -> None:
        for module in self.copies:
            del module.forward
        self.copies.clear()

    def __enter__(self) -> "DecodeLayout":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
