"""Text in, text out: a loaded model that completes prompts, over the one decoding loop.

`generate` yields one sample's token ids, `generate_samples` many samples of one prompt decoded
as one batch; both are `decoding.Decoder` with sliding allowed. `GenerationSession` adds the
tokenizer, the decode-time weight layout and streamed text (text.py): what the CLI calls.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from .. import tokenizer
from ..model.gpt2 import GPT2
from .decoding import Decoder
from .layouts import DecodeLayout
from .sampling import SamplingConfig
from .text import TextStream


@torch.inference_mode()
def generate(model: GPT2, prompt: list[int], cfg: SamplingConfig, *,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, up to `max_new_tokens`, ending before `stop_token`."""
    for _, token in generate_samples(model, prompt, cfg, [generator]):
        if token is None:
            return
        yield token


@torch.inference_mode()
def generate_samples(model: GPT2, prompt: list[int], cfg: SamplingConfig,
                     generators: list[torch.Generator | None]) -> Iterator[tuple[int, int | None]]:
    """Continue one prompt len(generators) times, decoded as one batch (the prompt computed
    once). Yields (sample, token id) step by step, and (sample, None) once when a sample ends;
    raises ValueError when a sample's logits are not finite."""
    decoder = Decoder(model, max_batch=len(generators))
    index = {decoder.submit(prompt, None, cfg, generator=g, slide=True): i for i, g in enumerate(generators)}
    while decoder.busy:
        for sequence, token in decoder.step():
            if sequence.finish_reason == "error":
                raise ValueError(sequence.error)
            yield index[sequence], token


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

    def __init__(self, model: GPT2, blocked: bool = True, quantize: str = "none") -> None:
        """`blocked`: install the decode-time weight layout (layouts.py) until `close`, which makes
        decoding a few rows 2-4x faster on CPUs at the cost of a copy of the weights; `quantize`
        names the copy's format ("int8": quantize.py)."""
        self.model = model
        self.device = model.token_embedding.weight.device
        self.layout = DecodeLayout(model, quantize)
        if blocked or quantize != "none":
            self.layout.install()

    def close(self) -> None:
        """Remove the decode-time layout: the model is as it was before the session."""
        self.layout.remove()

    def __enter__(self) -> "GenerationSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, prompt: str) -> list[int]:
        return tokenizer.encode_prompt(prompt)

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
        if cfg.max_new_tokens == 0 and len(ids) > context:  # nothing to slide over
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
