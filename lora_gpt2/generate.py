"""Sampling with a KV cache: each new token costs one position's work."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .model import GPT2, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float = 1.0
    stop_token: int | None = None  # stop a sample once it produces this token

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max-new-tokens must be >= 0, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top-k must be >= 1, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p!r}")


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """Pick the next token (B,) from the last position's logits (B, V)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass before it already reaches top_p; the best always stays
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def window_length(context: int) -> int:
    """Tokens kept when the context is full: sliding by a quarter amortises the re-prefill."""
    return max(1, context - context // 4)


@torch.inference_mode()
def generate(
    model: GPT2,
    prompt: list[int],
    cfg: SamplingConfig,
    *,
    batch: int = 1,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each of `batch` samples (B,), one step at a time.

    When the sequence fills the model's context, the cache is rebuilt from the most
    recent `window_length` tokens and generation goes on.
    """
    context = model.config.n_positions
    if not prompt:
        raise ValueError("the prompt is empty; it needs at least one token")
    device = model.token_embedding.weight.device
    tokens = torch.tensor(prompt, dtype=torch.long, device=device).expand(batch, -1)
    if tokens.size(1) > context:
        tokens = tokens[:, -window_length(context) :]
    cache = KVCache.empty(model.config, batch, model.frozen_dtype(), device)
    logits = model(tokens, cache)[:, -1]  # (B, V)
    history = tokens
    for step in range(cfg.max_new_tokens):
        token = next_token(logits, cfg, generator)  # (B,)
        yield token
        if step == cfg.max_new_tokens - 1:
            return  # no forward pass for a token nobody will read
        history = torch.cat([history, token[:, None]], dim=1)
        if cache.length == context:
            history = history[:, -window_length(context) :]
            cache.length = 0
            logits = model(history, cache)[:, -1]
        else:
            logits = model(token[:, None], cache)[:, -1]
