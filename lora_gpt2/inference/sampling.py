"""The maths of choosing a token: temperature, top-k, top-p, greedy, and the finiteness check.

`next_token` checks the logits and chooses; `choose_unchecked` only chooses, for a caller that
has checked a whole batch at once. Each row's draw comes from the generator it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


NOT_FINITE = ("the model produced logits that are not finite (NaN or inf); "
              "the adapter's tensors are damaged or diverged")


def require_finite(logits: torch.Tensor) -> None:
    """Raise when any logit is NaN or infinite (a damaged or diverged adapter)."""
    if not torch.isfinite(logits).all():
        raise ValueError(NOT_FINITE)


NUCLEUS_PROBE = 256  # top-p looks among this many best tokens first; the whole vocabulary is sorted only when
# their mass falls short of top_p (a flat distribution)


def _nucleus(values: torch.Tensor, ids: torch.Tensor, log_total: torch.Tensor,
             top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over candidates sorted best first (values (B, K), ids (B, K)), their probabilities
    taken against `log_total` (B, 1), the log of the whole distribution's mass: a token goes once
    the mass before it already reaches top_p; the best always stays. The candidates are cut after
    the last kept one, so the result depends only on what is kept, not on how many were looked at."""
    probs = (values - log_total).exp()
    dropped = (probs.cumsum(dim=-1) - probs) >= top_p
    keep = int((~dropped).sum(dim=-1).max())
    return values[:, :keep].masked_fill(dropped[:, :keep], float("-inf")).softmax(dim=-1), ids[:, :keep]


def _top_p_candidates(scaled: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over the whole vocabulary without sorting it when the nucleus lies among the
    NUCLEUS_PROBE best tokens (their mass reaches top_p): the same kept set either way."""
    log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (B, 1)
    if NUCLEUS_PROBE < scaled.size(-1):
        values, ids = torch.topk(scaled, NUCLEUS_PROBE, dim=-1)  # (B, k), sorted
        mass = (values - log_total).exp().cumsum(dim=-1)[:, -1]  # as _nucleus sums it
        if bool((mass >= top_p).all()):
            return _nucleus(values, ids, log_total, top_p)
    values, ids = torch.sort(scaled, descending=True, dim=-1)
    return _nucleus(values, ids, log_total, top_p)


def _candidates(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(probabilities (B, K), their token ids (B, K) or None for the whole vocabulary) after
    temperature, top-k and top-p; None when the choice is greedy.

    With top-k the distribution is built over the k best tokens only, never the whole
    vocabulary: no softmax, sort or draw over 50,257 entries per token. Top-p alone looks
    among the best 256 first (see `_top_p_candidates`).
    """
    if cfg.temperature == 0:
        return None
    scaled = logits.float() / cfg.temperature
    if not torch.isfinite(scaled).all():  # a temperature so small it overflows: its limit is greedy
        return None
    if cfg.top_k is not None and cfg.top_k < scaled.size(-1):
        values, ids = torch.topk(scaled, cfg.top_k, dim=-1)  # (B, k), sorted
        if cfg.top_p >= 1.0:
            return values.softmax(dim=-1), ids
        # top-p over the top-k distribution, renormalised (as transformers applies the two)
        return _nucleus(values, ids, torch.logsumexp(values, dim=-1, keepdim=True), cfg.top_p)
    if cfg.top_p < 1.0:
        return _top_p_candidates(scaled, cfg.top_p)
    return scaled.softmax(dim=-1), None


def _chosen(picks: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Token ids (B,) from the picked columns (B, 1)."""
    return (picks if ids is None else ids.gather(-1, picks)).squeeze(-1)


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """Check the logits (B, V) are finite, then pick the next token (B,), all rows with one generator."""
    require_finite(logits)
    return choose_unchecked(logits, cfg, generator)


def choose_unchecked(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """`next_token` without the finiteness check, for logits the caller has checked (the decoder
    checks a whole batch at once)."""
    candidates = _candidates(logits, cfg)
    if candidates is None:
        return logits.argmax(dim=-1)
    probs, ids = candidates
    return _chosen(torch.multinomial(probs, 1, generator=generator), ids)
