"""LoRA layers: a frozen weight plus a trainable low-rank update.

`Linear` and `Embedding` follow the original LoRA formulation (microsoft/LoRA):
the update is ``(lora_b @ lora_a) * scaling`` with ``scaling = alpha / r``, ``lora_a``
kaiming-uniform (normal for embeddings) and ``lora_b`` zeros, so a fresh layer equals
the frozen one. `FrozenLinear` / `FrozenEmbedding` are the same layers without an
update: a module that is not a LoRA target carries no LoRA parameters at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_lora(r: int, alpha: float | None, dropout: float) -> float:
    """Validate the LoRA arguments and return the scaling alpha / r."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r must be >= 1, got {r!r}")
    if alpha is None:
        alpha = r
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return alpha / r


class _Mergeable:
    """Explicit, idempotent merge / unmerge of `delta_weight()` into the frozen weight."""

    weight: nn.Parameter
    merged: bool

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


class FrozenLinear(nn.Module):
    """y = x W^T + b with W (out, in) and b frozen."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        _check_size("in_features", in_features)
        _check_size("out_features", out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # nn.Linear's default init, so a model built from scratch is usable before loading
        # (skipped on the meta device, where weights.py builds shapes only).
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Linear(_Mergeable, FrozenLinear):
    """A frozen linear layer plus a trainable rank-r update:

    forward(x) = linear(x, weight, bias) + (x @ lora_a.T @ lora_b.T) * scaling
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.scaling = _check_lora(r, alpha, dropout)
        self.r = r
        self.alpha = r if alpha is None else alpha
        self.lora_a = nn.Parameter(torch.empty(r, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.active = True  # False: behave as the frozen layer (see GPT2.lora_disabled)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_a.is_meta:
            return  # shapes only; weights.materialize_lora initialises the real tensors
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        """The update folded into `weight` by merge: (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or not self.active:
            return out
        # Low-rank side first: (.., in) -> (.., r) -> (.., out). The fp32 LoRA parameters
        # follow the activations' dtype, so bf16 weights never need a per-step cast.
        a = self.lora_a.to(x.dtype)
        b = self.lora_b.to(x.dtype)
        update = F.linear(F.linear(self.dropout(x), a), b)
        return torch.add(out, update, alpha=self.scaling)


class FrozenEmbedding(nn.Module):
    """A lookup table with a frozen weight (num_embeddings, embedding_dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        _check_size("num_embeddings", num_embeddings)
        _check_size("embedding_dim", embedding_dim)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        if not self.weight.is_meta:
            nn.init.normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Embedding(_Mergeable, FrozenEmbedding):
    """A frozen embedding plus a trainable rank-r update:

    forward(x) = embedding(x, weight) + (embedding(x, lora_a.T) @ lora_b.T) * scaling
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, r: int, alpha: float | None = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.scaling = _check_lora(r, alpha, 0.0)
        self.r = r
        self.alpha = r if alpha is None else alpha
        self.lora_a = nn.Parameter(torch.empty(r, num_embeddings))
        self.lora_b = nn.Parameter(torch.empty(embedding_dim, r))
        self.merged = False
        self.active = True
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_a.is_meta:
            return  # shapes only; weights.materialize_lora initialises the real tensors
        nn.init.normal_(self.lora_a)
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        """The update folded into `weight` by merge: (num, dim)."""
        return (self.lora_b @ self.lora_a).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.embedding(x, self.weight)
        if self.merged or not self.active:
            return out
        rows = F.embedding(x, self.lora_a.T)  # (.., r)
        update = rows @ self.lora_b.T  # (.., dim)
        return torch.add(out, update.to(out.dtype), alpha=self.scaling)


LORA_LAYERS = (Linear, Embedding)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The one definition of a LoRA parameter: `lora_a` / `lora_b` of a LoRA layer.

    Freezing, counting, saving and the tests all go through this function.
    """
    params: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            prefix = f"{module_name}." if module_name else ""
            params[f"{prefix}lora_a"] = module.lora_a
            params[f"{prefix}lora_b"] = module.lora_b
    return params


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything, then let gradients flow into the LoRA parameters alone."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(LoRA parameters, all parameters), each shared tensor counted once."""
    lora = sum(p.numel() for p in lora_parameters(model).values())
    return lora, sum(p.numel() for p in model.parameters())  # parameters() skips duplicates
