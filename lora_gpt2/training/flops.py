"""Model FLOPs of LoRA training, and the device's own matmul rate, for MFU."""

from __future__ import annotations

import time

import torch

from ..config import ModelConfig


def lora_training_flops_per_token(config: ModelConfig, block_size: int) -> float:
    """Forward (2N) + input gradients (2N) of every frozen matmul, plus attention.

    N counts the matmul weights, lm_head included; a frozen weight needs no weight
    gradient, and the rank-r LoRA work is negligible. Attention adds 4·L·T·d in the
    forward pass and as much again for its input gradients.
    """
    d, layers = config.n_embd, config.n_layer
    n_matmul = layers * (4 * d * d + 2 * d * config.ffn_size) + d * config.vocab_size
    return 4 * n_matmul + 8 * layers * block_size * d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                         repeats: int = 4) -> float:
    """Dense (n x n) @ (n x n) FLOP/s on `device` in `dtype`, best of a few timings."""
    n = n or (4096 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernels chosen, memory touched
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
