"""The optimiser over the adapter tensors alone, and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .config import OptimSettings


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` (and min_ratio after it)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter], o: OptimSettings,
                    fast: set[int] = frozenset()) -> torch.optim.Optimizer:
    """Adam(W) over the adapter tensors. With LoRA+ (`o.lora_plus_ratio`), the tensors whose
    ids are in `fast` form a second group at ratio x lr; each group keeps its `lr_scale`."""
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    if o.lora_plus_ratio is None:
        groups = [{"params": params, "lr_scale": 1.0}]
    else:
        groups = [{"params": [p for p in params if id(p) not in fast], "lr_scale": 1.0},
                  {"params": [p for p in params if id(p) in fast], "lr_scale": o.lora_plus_ratio}]
    groups = [group for group in groups if group["params"]]  # e.g. LoRA+ over embeddings alone
    for group in groups:
        group["lr"] = o.lr * group["lr_scale"]
    return cls(groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimSettings, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, max_steps, o.min_lr_ratio))


def apply_settings(optimizer: torch.optim.Optimizer, scheduler, o: OptimSettings) -> None:
    """After loading a saved state: the settings of this session (lr, betas, weight decay) win.

    `load_state_dict` restores the saved hyper-parameters; a resumed run with `--lr 0.01` must
    train at 0.01. The lr in force is recomputed exactly as the scheduler computes it, so an
    unchanged setting gives a bit-identical continuation.
    """
    scheduler.base_lrs = [o.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["betas"] = (o.beta1, o.beta2)
        group["weight_decay"] = o.weight_decay
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # LambdaLR's own expression
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
