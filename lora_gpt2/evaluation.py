"""Validation loss of a model, and the base-versus-adapter comparison that `lora-gpt2 eval` shows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .data import eval_windows, open_tokens
from .model import GPT2
from .prepare import ensure_prepared
from .train_config import DataSettings, RunSettings

# What a recorded setting is called in adapter.json, with the value used when neither the
# adapter nor the caller gives one: the training defaults, so an unrecorded run still matches.
DEFAULTS = {"data": DataSettings().data, "block_size": DataSettings().block_size,
            "batch_size": DataSettings().batch_size, "eval_batches": RunSettings().eval_batches}


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows, device: torch.device,
              interrupted: Callable[[], bool] = lambda: False) -> float | None:
    """Mean next-token loss over the evaluation windows (each window weighs the same);
    None when `interrupted()` turned true between two batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for x, y in windows:
            if interrupted():
                return None
            total += model(x.to(device), targets=y.to(device)).item() * x.size(0)
    finally:
        model.train(was_training)
    return total / sum(x.size(0) for x, _ in windows)


@dataclass(frozen=True)
class EvalSettings:
    data: str
    block_size: int
    batch_size: int
    eval_batches: int


def resolve_settings(recorded: dict[str, Any], context: int, **given: Any) -> EvalSettings:
    """A given value beats the adapter's recorded one, which beats the default; each is checked."""
    values = {}
    for name, default in DEFAULTS.items():
        value = given.get(name)
        if value is None:
            value = recorded.get(name)
        if value is None:
            value = min(default, context) if name == "block_size" else default
        values[name] = value
    for name in ("block_size", "batch_size", "eval_batches"):
        if values[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {values[name]}")
    if values["block_size"] > context:
        raise ValueError(f"block size {values['block_size']} is longer than the model's context of {context}")
    return EvalSettings(**values)


@dataclass(frozen=True)
class EvalReport:
    data: str
    windows: int
    block_size: int
    base_loss: float
    adapter_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a loss that is not finite is null, with the reason beside it (NaN is not JSON)."""
        result: dict[str, Any] = {"data": self.data, "windows": self.windows, "block_size": self.block_size,
                                  "base": _loss_entry(self.base_loss)}
        if self.adapter_loss is not None:
            result["adapter"] = _loss_entry(self.adapter_loss)
        return result


def _loss_entry(loss: float) -> dict[str, Any]:
    if math.isfinite(loss):
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}
    return {"loss": None, "perplexity": None, "reason": f"the loss is {loss} (not finite)"}


def compare(model: GPT2, settings: EvalSettings, with_adapter: bool) -> EvalReport:
    """Loss of the base model (adapter disabled) and, when asked, of base + adapter, on the same windows."""
    prepared = ensure_prepared(settings.data)
    windows = eval_windows(open_tokens(prepared.val), settings.block_size, settings.batch_size,
                           settings.eval_batches)
    device = model.token_embedding.weight.device
    adapted = mean_loss(model, windows, device) if with_adapter else None
    with model.lora_disabled():
        base = mean_loss(model, windows, device)
    return EvalReport(str(prepared.val), sum(x.size(0) for x, _ in windows), settings.block_size, base, adapted)
