"""The one decoding loop: sequences in, one token per sequence per step out.

`generate` (one sample, or many of one prompt) and `serve` (continuous batching across
adapters) both run this loop, so its rules hold for both by construction:

- a prompt needs at least one token; `fits` says whether prompt + max_new_tokens is within the
  model's context (the server refuses what does not; `generate` slides, below);
- a sequence ends before `stop_token` ("stop"), at `max_new_tokens` ("length"), on logits that
  are not finite ("error": that sequence alone), or when cancelled ("cancelled");
- no forward pass is made for a token nobody will read;
- a sequence that may slide (`slide=True`) and fills the context is recomputed from its last
  `window_length` tokens (positions are absolute, so cached keys cannot simply shift).

Each sequence has its own KV cache (in the batch's layout, kv.py: blocks of a shared pool by
default) and position, its own sampling settings and generator, and its own adapter (a row of
the bank, bank.py). Sequences that join together are prefilled
together: prompts of similar length share one forward, right-padded (causal attention never
lets a position see the padding after it), identical (prompt, adapter) pairs computed once.
Then every step runs one batched forward over all running sequences. Sequences join and leave
between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.gpt2 import GPT2, KVCache
from . import kv
from .bank import AdapterBank
from .sampling import NOT_FINITE, SamplingConfig, choose_unchecked

PREFILL_TOKENS = 2048  # at most this many positions (padding included) in one prefill forward


def window_length(context: int) -> int:
    """Tokens kept when the context is full: sliding by a quarter amortises the re-prefill."""
    return max(1, context - context // 4)


def fits(prompt_tokens: int, max_new_tokens: int, context: int) -> bool:
    """Whether a prompt and every token it may get stay within the model's context."""
    return prompt_tokens + max_new_tokens <= context


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    adapter: str | None
    cfg: SamplingConfig
    generator: torch.Generator | None
    slide: bool = False  # past the context, go on from the last window_length tokens
    logprobs: int | None = None  # also record each token's log-probability and this many best alternatives
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop", "cancelled" or "error" once done
    error: str | None = None  # why, when finish_reason is "error"
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    cache: object = None  # what the decoder's KV layout keeps for it (kv.py)
    logits: torch.Tensor | None = None  # (1, V): what the next token is drawn from

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Decoder:
    """`submit` queues a sequence, `step` advances every running one by a token and returns
    [(sequence, token, or None when it has just ended)]. `bank` serves per-row adapters; without
    one every sequence uses the model as it is (adapter None). `kv_layout` names where the
    caches live (kv.LAYOUTS)."""

    def __init__(self, model: GPT2, bank: AdapterBank | None = None, max_batch: int = 16,
                 kv_layout: str = "paged") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if bank is not None and bank.model is not model:
            raise ValueError("the adapter bank belongs to another model")
        self.model, self.bank, self.max_batch = model, bank, max_batch
        self.kv = kv.layout(kv_layout, model)
        self.context = model.config.n_positions
        self.device = model.token_embedding.weight.device
        self.waiting: list[Sequence] = []
        self.active: list[Sequence] = []
        self.prefills = 0  # prefills run so far (a server trims its freed memory after each)

    def submit(self, prompt: list[int], adapter: str | None, cfg: SamplingConfig, seed: int | None = None,
               logprobs: int | None = None, *, generator: torch.Generator | None = None,
               slide: bool = False) -> Sequence:
        if not prompt:
            raise ValueError("the prompt is empty; it needs at least one token")
        if not slide and not fits(len(prompt), cfg.max_new_tokens, self.context):
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {cfg.max_new_tokens} is more than the "
                             f"model's context of {self.context}")
        if adapter is not None and (self.bank is None or adapter not in self.bank):
            raise ValueError(f"unknown adapter {adapter!r}")
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        sequence = Sequence(list(prompt), adapter, cfg, generator, slide, logprobs)
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """End a sequence now (its client went away): it leaves the batch before the next step."""
        if not sequence.done:
            sequence.finish_reason = "cancelled"
        for queue in (self.waiting, self.active):
            if sequence in queue:
                queue.remove(sequence)
        self.kv.release(sequence)
        sequence.logits = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int | None]]:
        self._admit()
        events: list[tuple[Sequence, int | None]] = []
        going: list[tuple[Sequence, int]] = []
        active = list(self.active)
        greedy: list[int] = []
        finite: list[bool] = []
        if active:  # one finiteness check and one argmax for the whole batch, not one per sequence
            stacked = torch.cat([s.logits for s in active])  # (B, V)
            finite = torch.isfinite(stacked).all(dim=-1).tolist()
            greedy = stacked.argmax(dim=-1).tolist()
        for sequence, best, ok in zip(active, greedy, finite):
            if not ok:  # rows never mix, so only this sequence fails (a damaged adapter, an overflow)
                sequence.error = NOT_FINITE
                self._end(sequence, "error", events)
                continue
            cfg = sequence.cfg
            token = best if cfg.temperature == 0 else int(choose_unchecked(sequence.logits, cfg, sequence.generator))
            if cfg.max_new_tokens == 0 or token == cfg.stop_token:
                self._end(sequence, "length" if cfg.max_new_tokens == 0 else "stop", events)
                continue
            sequence.tokens.append(token)
            if sequence.logprobs is not None:  # of the model's distribution, before temperature or top-k
                self._record_logprobs(sequence, token)
            events.append((sequence, token))
            if len(sequence.tokens) == cfg.max_new_tokens:
                self._end(sequence, "length", events)  # no forward for a token nobody will read
            elif self.kv.full(sequence):  # only a sliding one gets here
                self.kv.release(sequence)
                self._prefill([sequence], window=True)
            else:
                going.append((sequence, token))
        if going:  # one batched forward: each row its adapter, its cache, its position
            rows = [s for s, _ in going]
            ids = torch.tensor([[token] for _, token in going], device=self.device)
            logits = self._forward(rows, ids, self.kv.step(rows), at=-1)
            for row, (sequence, _) in enumerate(going):
                sequence.logits = logits[row : row + 1]
        return events

    def _forward(self, rows: list[Sequence], ids: torch.Tensor, cache, at) -> torch.Tensor:
        if self.bank is None:
            return self.model(ids, cache, at=at)
        with self.bank.rows([s.adapter for s in rows]):
            return self.model(ids, cache, at=at)

    @staticmethod
    def _record_logprobs(sequence: Sequence, token: int) -> None:
        logp = torch.log_softmax(sequence.logits[0].float(), dim=-1)
        sequence.token_logprobs.append(float(logp[token]))
        if sequence.logprobs:
            values, ids = torch.topk(logp, sequence.logprobs)
            sequence.top_logprobs.append(dict(zip(ids.tolist(), values.tolist())))
        else:
            sequence.top_logprobs.append({})

    def _admit(self) -> None:
        joining: list[Sequence] = []
        while self.waiting and len(self.active) + len(joining) < self.max_batch:
            joining.append(self.waiting.pop(0))
        self.kv.reserve([len(self._window(s, False)) for s in joining])
        for group in prefill_groups(joining, lambda s: len(self._window(s, False))):
            self._prefill(group)
        self.active.extend(joining)

    def _window(self, sequence: Sequence, window: bool) -> list[int]:
        """What a sequence's cache is computed from: its prompt, or (sliding) its last tokens."""
        history = sequence.prompt + sequence.tokens
        if window or len(history) > self.context:
            return history[-window_length(self.context):]
        return history

    def _prefill(self, group: list[Sequence], window: bool = False) -> None:
        """One forward for the group's prompts (each distinct (prompt, adapter) once); each
        sequence then holds its own cache and logits."""
        self.prefills += 1
        config, dtype = self.model.config, self.model.frozen_dtype()
        keys = [(tuple(self._window(s, window)), s.adapter) for s in group]
        heads: dict[tuple, Sequence] = {}  # each distinct row, and a sequence that stands for it
        for key, sequence in zip(keys, group):
            heads.setdefault(key, sequence)
        row_of = {key: i for i, key in enumerate(heads)}
        lengths = [len(tokens) for tokens, _ in heads]
        width = max(lengths)
        ids = torch.tensor([list(t) + [0] * (width - len(t)) for t, _ in heads], device=self.device)  # (B, T)

        def room(sequence: Sequence, n: int) -> int:  # positions it can still reach
            return min(n + sequence.cfg.max_new_tokens - len(sequence.tokens), self.context)

        most = max(room(s, len(key[0])) for s, key in zip(group, keys))
        shared = KVCache.empty(config, len(heads), dtype, self.device, self.kv.prefill_room(len(group), width, most))
        logits = self._forward(list(heads.values()), ids, shared, at=torch.tensor(lengths, device=self.device) - 1)
        for sequence, key in zip(group, keys):
            row, n = row_of[key], len(key[0])
            sequence.logits = logits[row : row + 1]  # (1, V)
            self.kv.keep(sequence, shared, row, n, room(sequence, n))

    def _end(self, sequence: Sequence, reason: str, events: list) -> None:
        sequence.finish_reason = reason
        self.active.remove(sequence)
        self.kv.release(sequence)
        sequence.logits = None
        events.append((sequence, None))


def prefill_groups(sequences: list[Sequence], length=lambda s: len(s.prompt)) -> list[list[Sequence]]:
    """Sequences grouped for prefill by `length` (the tokens each computes): padding adds at most
    half again the group's real tokens, and at most PREFILL_TOKENS positions go in one forward."""
    groups: list[list[Sequence]] = []
    group: list[Sequence] = []
    for sequence in sorted(sequences, key=length):
        tokens = sum(length(s) for s in group) + length(sequence)
        padded = (len(group) + 1) * length(sequence)  # sorted: this prompt is the group's longest
        if group and (2 * padded > 3 * tokens or padded > PREFILL_TOKENS):
            groups.append(group)
            group = []
        group.append(sequence)
    return groups + ([group] if group else [])
