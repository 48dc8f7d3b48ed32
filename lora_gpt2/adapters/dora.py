"""DoRA (Liu et al. 2024): weight-decomposed LoRA, as PEFT's `use_dora` computes it.

The adapted weight is a trainable magnitude times the direction of the frozen weight plus the
LoRA update: W' = m * (W + s·BA) / ||W + s·BA||, the norm taken per output feature (per
embedding dimension for an embedding). As in the paper's §4.3 and PEFT, the norm is a constant
in backward. `magnitude` starts at ||W|| (B is zero), so a fresh layer equals the frozen one.
Each class is the plain LoRA layer plus that one idea; everything else (saving, counting,
LoRA+, PEFT names) asks the `AdapterLayer` interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import Embedding, Linear, LowRankTerms


class _Magnitude:
    """What both DoRA layers share: the magnitude tensor, its start at the weight's norm, and an
    exact merge. `NORM_DIM` is the weight's axis the norm runs over (the other one is the
    magnitude's): inputs for a linear (out, in) weight, the vocabulary for an (num, dim) table."""

    NORM_DIM: int

    def reset_adapter_parameters(self) -> None:
        super().reset_adapter_parameters()
        if getattr(self, "magnitude", None) is None:  # the base __init__ calls this before it exists
            size = self.weight.shape[1 - self.NORM_DIM]
            self.magnitude = nn.Parameter(torch.empty(size, device=self.lora_a.device))
        if self.magnitude.is_meta or self.weight.is_meta:
            return
        with torch.no_grad():
            self.magnitude.copy_(self.norm())

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "magnitude": self.magnitude}

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        """||W + delta|| along NORM_DIM, in float32, without a gradient."""
        return torch.linalg.norm(self.weight.float() + self.delta_weight(), dim=self.NORM_DIM)

    def _scale_shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(self.NORM_DIM)  # broadcast over the normed axis of the weight

    @torch.no_grad()
    def _merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the merged weight, the factor m / ||W + s·BA|| that unmerge divides out again)."""
        direction = self.weight.float() + self.delta_weight()
        factor = self.magnitude / torch.linalg.norm(direction, dim=self.NORM_DIM)
        return (direction * self._scale_shape(factor)).to(self.weight.dtype), factor

    def merged_weight(self) -> torch.Tensor:
        return self._merged()[0]

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged, self._factor = self._merged()
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        direction = self.weight.float() / self._scale_shape(self._factor)
        self.weight.copy_((direction - self.delta_weight()).to(self.weight.dtype))
        self.merged = False


class DoRALinear(_Magnitude, Linear):
    """forward(x) = bias + m/||W + s·BA|| * (x W^T + s · x A^T B^T); with dropout on the LoRA input,
    the direction's base part is recomputed on the dropped input, as PEFT does."""

    NORM_DIM = 1  # per output feature

    def fast_params(self) -> tuple[str, ...]:
        return ("lora_b", "magnitude")  # PEFT's LoRA+ helper: B and every 1-D tensor

    def low_rank_terms(self) -> LowRankTerms | None:
        if self.merged or not self.active:
            return LowRankTerms(self.weight)
        return None  # the magnitude scales every output: the fused loss calls forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active:
            return F.linear(x, self.weight, self.bias)
        scale = (self.magnitude / self.norm()).to(x.dtype)  # (out,)
        base = F.linear(x, self.weight)  # (.., out), no bias
        dropped = self.dropout(x)
        update = F.linear(F.linear(dropped, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scaling
        if dropped is x:
            out = scale * (base + update)
        else:  # PEFT: base + (scale - 1) * linear(dropout(x), W) + scale * update
            out = base + (scale - 1) * F.linear(dropped, self.weight) + scale * update
        return out if self.bias is None else out + self.bias


class DoRAEmbedding(_Magnitude, Embedding):
    """forward(x) = m/||W + s·(BA)^T|| * (W[x] + s · A^T[x] B^T), the norm per embedding dimension."""

    NORM_DIM = 0  # over the vocabulary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.embedding(x, self.weight)
        if self.merged or not self.active:
            return out
        rows = F.embedding(x, self.lora_a.T) @ self.lora_b.T  # (.., dim)
        scale = self.magnitude / self.norm()  # (dim,)
        return (scale * (out.float() + rows * self.scaling)).to(out.dtype)
