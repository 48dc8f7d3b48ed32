"""LoRA layers: a frozen weight plus a trainable low-rank update.

`Linear` and `Embedding` follow the original LoRA formulation (microsoft/LoRA):
the update is ``(lora_b @ lora_a) * scaling`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), ``lora_a``
kaiming-uniform (normal for embeddings) and ``lora_b`` zeros, so a fresh layer equals
the frozen one. `FrozenLinear` / `FrozenEmbedding` are the same layers without an
update: a module that is not a LoRA target carries no LoRA parameters at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoRAConfig
from ..errors import CheckpointError


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LowRankTerms:
    """What the fused lm_head loss may use: out = linear(x, weight) + scaling * linear(linear(x, a), b).

    `lora_a` / `lora_b` are None when the layer adds nothing (no update, merged, or disabled).
    """

    weight: torch.Tensor
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0


class AdapterLayer:
    """The interface every adapter layer declares. Freezing, counting, saving, loading, merging,
    the fused loss and PEFT export all go through it, never through attribute names; a variant
    with other parameters or other maths is one new class implementing these methods.
    """

    merged: bool
    active: bool  # False: behave as the frozen layer (see GPT2.lora_disabled)
    residual = False  # True: `start` changes the frozen weight (a residual init: residual.py)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, by local name ("lora_a", ...): what is trained and saved."""
        raise NotImplementedError

    def reset_adapter_parameters(self) -> None:
        """Initialise the trainable tensors so that the layer equals the frozen one."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the update into the frozen weight (explicit, idempotent)."""
        raise NotImplementedError

    def unmerge(self) -> None:
        """Undo `merge` (idempotent)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """What `merge` would write into the frozen weight, without writing it (in its dtype)."""
        raise NotImplementedError

    def low_rank_terms(self) -> LowRankTerms | None:
        """The terms the fused loss may use instead of `forward`, or None when it must call `forward`."""
        return None

    def fast_params(self) -> tuple[str, ...]:
        """Local names of the tensors LoRA+ trains at its larger learning rate (none by default)."""
        return ()

    def saved_params(self) -> dict[str, torch.Tensor]:
        """What an adapter folder holds for this layer, by local name (the trained tensors by default)."""
        return dict(self.adapter_params())

    @torch.no_grad()
    def start(self, saved: dict[str, torch.Tensor] | None = None) -> None:
        """Begin, once the frozen weight is real: afresh (None), or from what `saved_params` wrote."""
        if saved is not None:
            for local, param in self.adapter_params().items():
                param.copy_(saved[local])

    def materialize(self, device: str | torch.device) -> None:
        """Real, freshly initialised float32 adapter tensors for a layer built on the meta device."""
        for name, param in self.adapter_params().items():
            setattr(self, name, nn.Parameter(torch.empty(param.shape, device=device)))
        self.reset_adapter_parameters()


class _AdditiveUpdate(AdapterLayer):
    """Merge / unmerge for updates that add `delta_weight()` to the frozen weight (plain LoRA)."""

    weight: nn.Parameter

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_a": self.lora_a, "lora_b": self.lora_b}

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
        # (skipped on the meta device, where checkpoints/hf.py builds shapes only).
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Linear(_AdditiveUpdate, FrozenLinear):
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
        rslora: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        cfg = LoRAConfig(targets=(), r=r, alpha=alpha, dropout=dropout, rslora=rslora)  # the one validator
        self.r, self.alpha, self.scaling = r, cfg.alpha_value, cfg.scaling
        self.lora_a = nn.Parameter(torch.empty(r, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.active = True
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        if self.lora_a.is_meta:
            return  # shapes only; `materialize` initialises the real tensors
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)
        nn.init.zeros_(self.lora_b)

    def low_rank_terms(self) -> LowRankTerms | None:
        if self.merged or not self.active:
            return LowRankTerms(self.weight)
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None  # the dropout mask is needed again in backward: use forward
        return LowRankTerms(self.weight, self.lora_a, self.lora_b, self.scaling)

    def fast_params(self) -> tuple[str, ...]:
        # LoRA+ (Hayou et al. 2024): B learns faster than A. Embeddings keep one rate: PEFT's
        # helper gives them a fixed 1e-6 instead, which would all but freeze them.
        return ("lora_b",)

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


class Embedding(_AdditiveUpdate, FrozenEmbedding):
    """A frozen embedding plus a trainable rank-r update:

    forward(x) = embedding(x, weight) + (embedding(x, lora_a.T) @ lora_b.T) * scaling
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, r: int, alpha: float | None = None, rslora: bool = False
    ) -> None:
        super().__init__(num_embeddings, embedding_dim)
        cfg = LoRAConfig(targets=(), r=r, alpha=alpha, rslora=rslora)
        self.r, self.alpha, self.scaling = r, cfg.alpha_value, cfg.scaling
        self.lora_a = nn.Parameter(torch.empty(r, num_embeddings))
        self.lora_b = nn.Parameter(torch.empty(embedding_dim, r))
        self.merged = False
        self.active = True
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        if self.lora_a.is_meta:
            return  # shapes only; `materialize` initialises the real tensors
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


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of `model`, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The one definition of a trainable adapter tensor: what each adapter layer declares.

    Freezing, counting, saving, loading and the tests all go through this function.
    """
    params: dict[str, nn.Parameter] = {}
    for module_name, layer in adapter_layers(model).items():
        prefix = f"{module_name}." if module_name else ""
        params.update({prefix + local: p for local, p in layer.adapter_params().items()})
    return params


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter folder holds: each layer's `saved_params`, by full name."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, layer in adapter_layers(model).items():
        prefix = f"{module_name}." if module_name else ""
        tensors.update({prefix + local: t for local, t in layer.saved_params().items()})
    return tensors


def start_adapters(model: nn.Module, saved: dict[str, torch.Tensor] | None = None, source: str = "adapter") -> None:
    """Begin every adapter layer afresh, or from `saved` (as `saved_tensors` names them): the same
    names and shapes, all of them, or CheckpointError naming the first that differs."""
    layers = adapter_layers(model)
    if saved is not None:
        expected = {k: tuple(t.shape) for k, t in saved_tensors(model).items()}
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or extra:
            what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
            raise CheckpointError(f"{source}: {what}")
        for name, shape in expected.items():
            if tuple(saved[name].shape) != shape:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(saved[name].shape)}, "
                                      f"expected {shape}")
    for module_name, layer in layers.items():
        prefix = f"{module_name}." if module_name else ""
        mine = None if saved is None else {local: saved[prefix + local] for local in layer.saved_params()}
        layer.start(mine)


def fast_parameters(model: nn.Module) -> set[int]:
    """ids of the tensors the adapter layers declare for LoRA+'s larger learning rate."""
    return {id(p) for layer in adapter_layers(model).values()
            for local, p in layer.adapter_params().items() if local in layer.fast_params()}


def head_terms(module: nn.Module) -> LowRankTerms | None:
    """The fused loss's view of an output layer: its terms, or None to call its forward."""
    if module._forward_hooks or "forward" in vars(module):
        return None  # something adds to its output (a bank's rows) or replaces it (an int8 copy): call it
    if isinstance(module, AdapterLayer):
        return module.low_rank_terms()
    if isinstance(module, FrozenLinear):
        return LowRankTerms(module.weight)
    return None


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything, then let gradients flow into the adapter tensors alone."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter parameters, all parameters), each shared tensor counted once."""
    lora = sum(p.numel() for p in lora_parameters(model).values())
    return lora, sum(p.numel() for p in model.parameters())  # parameters() skips duplicates
