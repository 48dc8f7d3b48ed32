"""Continuous batching: requests for different adapters decoded together, one token per step.

Each request has its own KV cache and its own position. Requests that join together are
prefilled together: prompts of similar length share one forward, right-padded (causal attention
never lets a position see the padding after it), row i with its adapter, and each request's
cache takes its own rows. Then every step runs one batched forward over all active requests,
in which row i adds its adapter's update (bank.py) and attends to its own cache. Requests join
and leave between steps. Sampling is per request (its settings, its seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bank import AdapterBank
from .generate import NOT_FINITE, SamplingConfig, sample_token
from .model import KVCache


@dataclass(eq=False)
class Request:
    prompt: list[int]
    adapter: str | None
    cfg: SamplingConfig
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop", "cancelled" or "error" once done
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: int | None = None  # also record each token's log-probability and this many best alternatives
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    cache: KVCache | None = None
    logits: torch.Tensor | None = None  # (1, V): what the next token is drawn from

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class BatchDecoder:
    """Requests in, tokens out: `submit` queues a request, `step` advances every active one by a
    token and returns [(request, token or None when it has just ended)]."""

    def __init__(self, bank: AdapterBank, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bank, self.model, self.max_batch = bank, bank.model, max_batch
        self.waiting: list[Request] = []
        self.active: list[Request] = []

    def submit(self, prompt: list[int], adapter: str | None, cfg: SamplingConfig, seed: int | None = None,
               logprobs: int | None = None) -> Request:
        context = self.model.config.n_positions
        if not prompt:
            raise ValueError("the prompt is empty; it needs at least one token")
        if len(prompt) + cfg.max_new_tokens > context:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {cfg.max_new_tokens} is more than the "
                             f"model's context of {context}")
        if adapter is not None and adapter not in self.bank:
            raise ValueError(f"unknown adapter {adapter!r}")
        device = self.model.token_embedding.weight.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        request = Request(list(prompt), adapter, cfg, generator, logprobs=logprobs)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End a request now (its client went away): it leaves the batch before the next step."""
        if not request.done:
            request.finish_reason = "cancelled"
        for queue in (self.waiting, self.active):
            if request in queue:
                queue.remove(request)
        request.cache = request.logits = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int | None]]:
        self._admit()
        events: list[tuple[Request, int | None]] = []
        going: list[tuple[Request, int]] = []
        active = list(self.active)
        greedy: list[int] = []
        finite: list[bool] = []
        if active:  # one finiteness check and one argmax for the whole batch, not one per request
            stacked = torch.cat([r.logits for r in active])  # (B, V)
            finite = torch.isfinite(stacked).all(dim=-1).tolist()
            greedy = stacked.argmax(dim=-1).tolist()
        for request, best, ok in zip(active, greedy, finite):
            if not ok:  # rows never mix, so only this request fails (a damaged adapter, an overflow)
                request.error = NOT_FINITE
                self._end(request, "error", events)
                continue
            sampled = request.cfg.temperature != 0
            token = int(sample_token(request.logits, request.cfg, request.generator)) if sampled else best
            if request.cfg.max_new_tokens == 0 or token == request.cfg.stop_token:
                self._end(request, "length" if request.cfg.max_new_tokens == 0 else "stop", events)
                continue
            request.tokens.append(token)
            if request.logprobs is not None:  # of the model's distribution, before temperature or top-k
                self._record_logprobs(request, token)
            events.append((request, token))
            if len(request.tokens) == request.cfg.max_new_tokens:
                self._end(request, "length", events)
            else:
                going.append((request, token))
        if going:  # one batched forward: each row its adapter, its cache, its position
            ids = torch.tensor([[token] for _, token in going], device=self.model.token_embedding.weight.device)
            with self.bank.rows([r.adapter for r, _ in going]):
                logits = self.model(ids, [r.cache for r, _ in going], at=-1)
            for row, (request, _) in enumerate(going):
                request.logits = logits[row : row + 1]
        return events

    @staticmethod
    def _record_logprobs(request: Request, token: int) -> None:
        logp = torch.log_softmax(request.logits[0].float(), dim=-1)
        request.token_logprobs.append(float(logp[token]))
        if request.logprobs:
            values, ids = torch.topk(logp, request.logprobs)
            request.top_logprobs.append(dict(zip(ids.tolist(), values.tolist())))
        else:
            request.top_logprobs.append({})

    def _admit(self) -> None:
        joining: list[Request] = []
        while self.waiting and len(self.active) + len(joining) < self.max_batch:
            joining.append(self.waiting.pop(0))
        for group in prefill_groups(joining):
            self._prefill(group)
        self.active.extend(joining)

    def _prefill(self, group: list[Request]) -> None:
        """One forward for the group's prompts; each request then holds its own cache and logits."""
        config, dtype = self.model.config, self.model.frozen_dtype()
        device = self.model.token_embedding.weight.device
        lengths = [len(r.prompt) for r in group]
        width = max(lengths)
        ids = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in group], device=device)  # (B, T)
        alone = len(group) == 1  # then the shared cache is the request's own, with room for its tokens
        room = width + group[0].cfg.max_new_tokens if alone else width
        shared = KVCache.empty(config, len(group), dtype, device, room)
        with self.bank.rows([r.adapter for r in group]):
            logits = self.model(ids, shared, at=torch.tensor(lengths, device=device) - 1)  # (B, V)
        for i, (request, n) in enumerate(zip(group, lengths)):
            request.logits = logits[i : i + 1]
            if alone:
                request.cache = shared
                continue
            request.cache = KVCache.empty(config, 1, dtype, device, n + request.cfg.max_new_tokens)
            for mine, ours in zip(request.cache.keys + request.cache.values, shared.keys + shared.values):
                mine[:, :, :n] = ours[i : i + 1, :, :n]
            request.cache.length = n

    def _end(self, request: Request, reason: str, events: list) -> None:
        request.finish_reason = reason
        self.active.remove(request)
        request.cache = request.logits = None
        events.append((request, None))


PREFILL_TOKENS = 2048  # at most this many positions (padding included) in one prefill forward


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Requests grouped for prefill: by prompt length, so that padding adds at most half again
    the group's real tokens, and at most PREFILL_TOKENS positions per forward."""
    groups: list[list[Request]] = []
    group: list[Request] = []
    for request in sorted(requests, key=lambda r: len(r.prompt)):
        tokens = sum(len(r.prompt) for r in group) + len(request.prompt)
        padded = (len(group) + 1) * len(request.prompt)  # sorted: this prompt is the group's longest
        if group and (2 * padded > 3 * tokens or padded > PREFILL_TOKENS):
            groups.append(group)
            group = []
        group.append(request)
    return groups + ([group] if group else [])
