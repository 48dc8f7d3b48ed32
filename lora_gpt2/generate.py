"""Sampling with a KV cache (each new token costs one position's work), and a text session on top.

`generate` yields token ids; `GenerationSession` turns a prompt into streamed text pieces
(incremental UTF-8 decoding, stop handling): what the CLI and a server call.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from . import tokenizer
from .model import GPT2, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float = 1.0
    stop_token: int | None = None  # end a sample at this token (it is not part of the output)

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
    if not torch.isfinite(logits).all():
        raise ValueError("the model produced logits that are not finite (NaN or inf); "
                         "the adapter's tensors are damaged or diverged")
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / cfg.temperature
    if not torch.isfinite(scaled).all():  # a temperature so small it overflows: its limit is greedy
        return logits.argmax(dim=-1)
    logits = scaled
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
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time, up to `max_new_tokens`, ending before `stop_token`.

    When the sequence fills the model's context, the cache is rebuilt from the most recent
    `window_length` tokens (positions are absolute, so cached keys cannot simply shift).
    """
    context = model.config.n_positions
    if not prompt:
        raise ValueError("the prompt is empty; it needs at least one token")
    device = model.token_embedding.weight.device
    history = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    if history.size(1) > context:
        history = history[:, -window_length(context) :]
    cache = KVCache.empty(model.config, 1, model.frozen_dtype(), device)
    logits = model(history, cache)[:, -1]  # (1, V)
    for step in range(cfg.max_new_tokens):
        token = next_token(logits, cfg, generator)  # (1,)
        if cfg.stop_token is not None and int(token) == cfg.stop_token:
            return
        yield int(token)
        if step == cfg.max_new_tokens - 1:
            return  # no forward pass for a token nobody will read
        history = torch.cat([history, token[:, None]], dim=1)
        if cache.length == context:
            history = history[:, -window_length(context) :]
            cache.length = 0
            logits = model(history, cache)[:, -1]
        else:
            logits = model(token[:, None], cache)[:, -1]


class TextStream:
    """Text pieces of one completion as they are generated; `tokens` and `finish_reason` once done.

    A piece is whatever the new token completes: bytes of a character split across tokens wait
    for the rest, so every piece is valid text.
    """

    def __init__(self, tokens: Iterator[int], max_new_tokens: int) -> None:
        self._tokens = tokens
        self._max = max_new_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "length" or "stop"

    def __iter__(self) -> Iterator[str]:
        enc = tokenizer.get_encoding()
        for token in self._tokens:
            self.tokens.append(token)
            piece = self._decoder.decode(enc.decode_single_token_bytes(token))
            if piece:
                yield piece
        rest = self._decoder.decode(b"", final=True)
        if rest:
            yield rest
        self.finish_reason = "length" if len(self.tokens) == self._max else "stop"


class GenerationSession:
    """A loaded model that completes text prompts: load once, then stream as many completions as asked."""

    def __init__(self, model: GPT2) -> None:
        self.model = model
        self.device = model.token_embedding.weight.device

    def encode(self, prompt: str) -> list[int]:
        """The prompt's tokens; an empty prompt starts a new document (<|endoftext|>)."""
        return tokenizer.encode(prompt) or [tokenizer.EOT_ID]

    def generator(self, seed: int) -> torch.Generator:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return torch.Generator(device=self.device).manual_seed(seed)

    def stream(self, prompt: str | list[int], cfg: SamplingConfig,
               generator: torch.Generator | None = None) -> TextStream:
        """Text pieces continuing `prompt` (text or token ids), sampled as `cfg` says."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        context = self.model.config.n_positions
        if cfg.max_new_tokens == 0 and len(ids) > context:
            raise ValueError(f"prompt has {len(ids)} tokens, longer than the model's context of "
                             f"{context}, and --max-new-tokens is 0")
        return TextStream(generate(self.model, ids, cfg, generator=generator), cfg.max_new_tokens)

    def complete(self, prompt: str | list[int], cfg: SamplingConfig,
                 generator: torch.Generator | None = None) -> tuple[str, TextStream]:
        """(the whole completion, its stream with tokens and finish_reason)."""
        stream = self.stream(prompt, cfg, generator)
        return "".join(stream), stream
