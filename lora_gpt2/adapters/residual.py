"""A LoRA linear layer whose first update is taken out of its own frozen weight (PiSSA, OLoRA).

At the start, (A0, B0) = decompose(W); the trained tensors begin at A0, B0 and the frozen
weight becomes the residual W - s·B0A0, so the layer still equals the frozen one. It is saved
as PEFT's `path_initial_model_for_weight_conversion` saves it: [A; A0] and [B, -B0], a rank-2r
plain LoRA update B A - B0 A0 on the *original* W (see variants.saved_config), which every
reader applies as any other adapter. `start(saved)` splits that form again and computes the
residual from the same tensors with the same expression, so a resumed run is bit-identical.
"""

from __future__ import annotations

from typing import Callable

import torch

from .lora import Linear


class ResidualLinear(Linear):
    residual = True

    def __init__(self, in_features: int, out_features: int, bias: bool, r: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False, decompose: Callable | None = None) -> None:
        super().__init__(in_features, out_features, bias, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        self.decompose = decompose
        # the first update, kept to save the trained one relative to the original weight
        self.register_buffer("initial_a", torch.zeros(r, in_features), persistent=False)
        self.register_buffer("initial_b", torch.zeros(out_features, r), persistent=False)
        self.started = False

    def materialize(self, device: str | torch.device) -> None:
        self.initial_a = torch.zeros(self.initial_a.shape, device=device)
        self.initial_b = torch.zeros(self.initial_b.shape, device=device)
        super().materialize(device)

    @torch.no_grad()
    def start(self, saved: dict[str, torch.Tensor] | None = None) -> None:
        if self.started:
            raise RuntimeError("a residual adapter layer starts once: its weight is already the residual")
        if saved is None:
            a0, b0 = self.decompose(self.weight.float(), self.r, self.scaling)
            a, b = a0, b0
        else:
            a, a0 = saved["lora_a"][: self.r], saved["lora_a"][self.r:]
            b, b0 = saved["lora_b"][:, : self.r], -saved["lora_b"][:, self.r:]
        self.lora_a.copy_(a)
        self.lora_b.copy_(b)
        self.initial_a.copy_(a0)
        self.initial_b.copy_(b0)
        residual = self.weight.float() - self.scaling * (self.initial_b @ self.initial_a)
        self.weight.copy_(residual.to(self.weight.dtype))
        self.started = True

    def saved_params(self) -> dict[str, torch.Tensor]:
        return {"lora_a": torch.cat([self.lora_a, self.initial_a], dim=0),
                "lora_b": torch.cat([self.lora_b, -self.initial_b], dim=1)}
