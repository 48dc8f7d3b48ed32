"""Sampling with a KV cache (each new token costs one position's work), and a text session on top.

`generate` yields token ids; `GenerationSession` turns a prompt into streamed text pieces
(incremental UTF-8 decoding, stop handling): what the CLI and a server call.
"""

from __future__ import annotations

import codecs
import math
from collections import deque
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


NOT_FINITE = ("the model produced logits that are not finite (NaN or inf); "
              "the adapter's tensors are damaged or diverged")


def checked_logits(logits: torch.Tensor) -> None:
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
    """Pick the next token (B,) from the last position's logits (B, V), all rows with one generator."""
    checked_logits(logits)
    return sample_token(logits, cfg, generator)


def sample_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """`next_token` for logits whose finiteness the caller has checked (the server checks a
    whole batch at once)."""
    candidates = _candidates(logits, cfg)
    if candidates is None:
        return logits.argmax(dim=-1)
    probs, ids = candidates
    return _chosen(torch.multinomial(probs, 1, generator=generator), ids)


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator | None]):
    """Row i's next token from its own generator: what a sample draws does not depend on which
    other samples share its batch."""
    checked_logits(logits)
    candidates = _candidates(logits, cfg)
    if candidates is None:
        return logits.argmax(dim=-1)
    probs, ids = candidates
    picks = torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generators)])
    return _chosen(picks, ids)


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
    """Yield new token ids one at a time, up to `max_new_tokens`, ending before `stop_token`."""
    for _, token in generate_samples(model, prompt, cfg, [generator]):
        if token is None:
            return
        yield token


@torch.inference_mode()
def generate_samples(
    model: GPT2,
    prompt: list[int],
    cfg: SamplingConfig,
    generators: list[torch.Generator | None],
) -> Iterator[tuple[int, int | None]]:
    """Continue one prompt len(generators) times, decoding the samples as one batch with one KV
    cache. Yields (sample, token id) step by step, and (sample, None) once when a sample ends
    (at `max_new_tokens`, or before `stop_token`); an ended sample leaves the batch.

    The prompt is computed once and its cache copied to every row. When the sequence fills the
    model's context, the cache is rebuilt from the most recent `window_length` tokens
    (positions are absolute, so cached keys cannot simply shift).
    """
    context = model.config.n_positions
    if not prompt:
        raise ValueError("the prompt is empty; it needs at least one token")
    device = model.token_embedding.weight.device
    history = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    if history.size(1) > context:
        history = history[:, -window_length(context) :]
    n = len(generators)
    # room for what this request can reach, not the whole context: n rows of GPT-2 small's
    # full context would be 75 MB each in float32
    cache = KVCache.empty(model.config, 1, model.frozen_dtype(), device, history.size(1) + cfg.max_new_tokens)
    logits = model(history, cache, at=-1)  # (1, V)
    live = list(range(n))  # sample index of each row
    if n > 1:
        cache.repeat_rows(n)
        logits, history = logits.expand(n, -1), history.expand(n, -1)
    for step in range(cfg.max_new_tokens):
        tokens = next_tokens(logits, cfg, [generators[i] for i in live])  # (B,)
        values = tokens.tolist()
        ended = [row for row, token in enumerate(values) if token == cfg.stop_token]
        for row, token in enumerate(values):
            yield live[row], None if row in ended else token
        last = step == cfg.max_new_tokens - 1
        if last or len(ended) == len(live):
            if last:
                for row in range(len(live)):
                    if row not in ended:
                        yield live[row], None
            return  # no forward pass for a token nobody will read
        if ended:
            keep = [row for row in range(len(live)) if row not in ended]
            rows = torch.tensor(keep, device=device)
            cache.keep_rows(rows)
            tokens, history = tokens.index_select(0, rows), history.index_select(0, rows)
            live = [live[row] for row in keep]
        history = torch.cat([history, tokens[:, None]], dim=1)
        if cache.length == context:
            history = history[:, -window_length(context) :]
            cache.length = 0
            logits = model(history, cache, at=-1)
        else:
            logits = model(tokens[:, None], cache, at=-1)


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


class _Fanout:
    """Routes a batch's (sample, token) pairs to per-sample queues, pulling more on demand."""

    def __init__(self, source: Iterator[tuple[int, int | None]], n: int) -> None:
        self.source = source
        self.queues: list[deque[int]] = [deque() for _ in range(n)]
        self.ended = [False] * n

    def tokens(self, i: int) -> Iterator[int]:
        while True:
            while self.queues[i]:
                yield self.queues[i].popleft()
            if self.ended[i]:
                return
            sample, token = next(self.source)  # every sample ends before the source does
            if token is None:
                self.ended[sample] = True
            else:
                self.queues[sample].append(token)


class GenerationSession:
    """A loaded model that completes text prompts: load once, then stream as many completions as asked."""

    def __init__(self, model: GPT2, pack: bool = True) -> None:
        """`pack`: give the model's frozen weights their decode-time layout (packed.py), which
        makes decoding a few rows 2-4x faster on CPUs at the cost of a copy of the weights."""
        self.model = model
        self.device = model.token_embedding.weight.device
        if pack:
            model.pack_for_decoding()

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
        self._check_prompt(ids, cfg)
        return TextStream(generate(self.model, ids, cfg, generator=generator), cfg.max_new_tokens)

    def _check_prompt(self, ids: list[int], cfg: SamplingConfig) -> None:
        context = self.model.config.n_positions
        if cfg.max_new_tokens == 0 and len(ids) > context:
            raise ValueError(f"prompt has {len(ids)} tokens, longer than the model's context of "
                             f"{context}, and --max-new-tokens is 0")

    def stream_samples(self, prompt: str | list[int], cfg: SamplingConfig, seeds: list[int],
                       batch_size: int = 8) -> list[TextStream]:
        """One stream per seed, continuing the same prompt; up to `batch_size` samples are decoded
        together in one batch. Sample i draws from its own generator seeded with seeds[i], so its
        text does not depend on the batching. Read the streams in any order: reading one
        advances its batch, and its batch-mates' tokens wait in their streams."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids, cfg)
        generators = [self.generator(seed) for seed in seeds]
        batches: dict[int, _Fanout] = {}

        def tokens(i: int) -> Iterator[int]:
            first = i - i % batch_size
            if first not in batches:  # a batch starts when one of its streams is first read
                group = generators[first : first + batch_size]
                batches[first] = _Fanout(generate_samples(self.model, ids, cfg, group), len(group))
            yield from batches[first].tokens(i - first)

        return [TextStream(tokens(i), cfg.max_new_tokens) for i in range(len(seeds))]

    def complete(self, prompt: str | list[int], cfg: SamplingConfig,
                 generator: torch.Generator | None = None) -> tuple[str, TextStream]:
        """(the whole completion, its stream with tokens and finish_reason)."""
        stream = self.stream(prompt, cfg, generator)
        return "".join(stream), stream
