"""Validation loss of a model, and the base-versus-adapter comparison that `lora-gpt2 eval` shows."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager

import torch

from ..data import Options, ensure_prepared, eval_batches, located, mask_prompt_for, resolve
from ..model.gpt2 import GPT2
from .config import SETTINGS



@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches, device: torch.device,
              interrupted: Callable[[], bool] = lambda: False) -> float | None:
    """Mean next-token loss over every counted target of the evaluation batches (padding and
    masked prompts are not counted, as in training); None when `interrupted()` turned true
    between two batches."""
    was_training = model.training
    model.eval()
    total, counted = 0.0, 0
    try:
        for x, y in batches:
            if interrupted():
                return None
            total += model(x.to(device), targets=y.to(device), reduction="sum").item()
            counted += int((y >= 0).sum())
    finally:
        model.train(was_training)
    return total / counted if counted else math.nan


@dataclass(frozen=True)
class EvalSettings:
    data: str
    block_size: int
    batch_size: int
    eval_batches: int
    mask_prompt: bool | None = None
    train_on: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    chat_template: str | None = None  # the adapter's template text, used when the data is chat

    @property
    def options(self) -> Options:
        """How to read the data: the template applies to chat data alone (an adapter's
        template says nothing about text or prompt/completion data)."""
        options = Options(self.text_column, self.prompt_column, self.completion_column, self.chat_template)
        if options.chat_template is None or resolve(self.data, options.columns()).kind.chat:
            return options
        return options.columns()


# Each setting with the value used when neither the adapter nor the caller gives one: its
# training default, read from its one declaration, so an unrecorded run still matches.
DEFAULTS = {f.name: SETTINGS[f.name].default for f in fields(EvalSettings)}
COUNTS = ("block_size", "batch_size", "eval_batches")


def check_given(data: str | None = None, **counts: Any) -> None:
    """What can be checked of the given settings before a model loads: the data is there, and
    each count given is >= 1."""
    if data is not None:
        located(data)
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def resolve_settings(recorded: dict[str, Any], context: int, **given: Any) -> EvalSettings:
    """A given value beats the adapter's recorded one, which beats the default; each is checked."""
    values = {}
    if given.get("data") is not None and given["data"] != recorded.get("data"):
        # other data: how the run's data was read (CSV columns, masking) says nothing about it
        recorded = {k: v for k, v in recorded.items() if k in ("block_size", "batch_size", "eval_batches")}
    for name, default in DEFAULTS.items():
        value = given.get(name)
        if value is None:
            value = recorded.get(name)
        if value is None:
            value = min(default, context) if name == "block_size" else default
        values[name] = value
    check_given(**{name: values[name] for name in COUNTS})
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
    counted: int = 0  # targets the loss counts
    kind: str = "text"
    mask_prompt: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a loss that is not finite is null, with the reason beside it (NaN is not JSON)."""
        result: dict[str, Any] = {"data": self.data, "kind": self.kind, "mask_prompt": self.mask_prompt,
                                  "windows": self.windows, "block_size": self.block_size,
                                  "counted_tokens": self.counted, "base": _loss_entry(self.base_loss)}
        if self.adapter_loss is not None:
            result["adapter"] = _loss_entry(self.adapter_loss)
        return result


def _loss_entry(loss: float) -> dict[str, Any]:
    if math.isfinite(loss):
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}
    return {"loss": None, "perplexity": None, "reason": f"the loss is {loss} (not finite)"}


def compare(model: GPT2, settings: EvalSettings, with_adapter: bool,
            within: Callable[[], ContextManager] = contextlib.nullcontext) -> EvalReport:
    """Loss of the base model (adapter disabled) and, when asked, of base + adapter, on the same
    windows. Each loss is computed inside a fresh `within()`, entered after the adapter is
    disabled for the base's (`eval --quantize` passes the decode-time layout: each model's own
    int8 copies)."""
    prepared = ensure_prepared(settings.data, settings.options)
    mask = mask_prompt_for(prepared, settings.mask_prompt, settings.train_on)
    batches = eval_batches(prepared, block_size=settings.block_size, batch_size=settings.batch_size,
                           max_batches=settings.eval_batches, mask_prompt=mask)
    device = model.token_embedding.weight.device

    def loss() -> float | None:
        with within():
            return mean_loss(model, batches, device)

    adapted = loss() if with_adapter else None
    with model.lora_disabled():
        base = loss()
    return EvalReport(str(prepared.val), sum(x.size(0) for x, _ in batches), settings.block_size, base, adapted,
                      sum(int((y >= 0).sum()) for _, y in batches), prepared.kind, mask)
