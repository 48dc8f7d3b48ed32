"""One request in the engine, and how its answer is written: OpenAI's completions
(`text_completion`) and chat completions (`chat.completion`, streamed as `.chunk`s with deltas).

A request is n choices per prompt, each a job in the engine; its events arrive from the decoding
thread through a queue and are turned into text (stop strings held back until they cannot
match), logprobs, and the figures /metrics counts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator

from .. import tokenizer
from ..inference.sampling import SamplingConfig
from ..inference.text import TextDecoder
from .engine import Engine, Job
from .metrics import Metrics
from .request import ApiError, Completion


class CompletionRun:
    """One completions request: n choices per prompt, each a job in the engine."""

    id_prefix, object = "cmpl-", "text_completion"
    stop_token: int | None = None  # a completion may run past <|endoftext|>, as the model writes it

    def __init__(self, engine: Engine, c: Completion, adapter: str | None, prompts: list[list[int]],
                 recorder: "Recorder") -> None:
        self.engine, self.c, self.prompts, self.recorder = engine, c, prompts, recorder
        self.id = f"{self.id_prefix}{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        base_seed = c.seed if c.seed is not None else secrets.randbits(62)
        cfg = SamplingConfig(max_new_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p,
                             stop_token=self.stop_token)
        self.jobs: list[Job] = []
        self.texts: list[TextDecoder] = []
        for p, ids in enumerate(prompts):
            for j in range(c.n):
                index = p * c.n + j
                sink = (lambda i: lambda kind, value: self.loop.call_soon_threadsafe(
                    self.queue.put_nowait, (i, kind, value)))(index)
                self.jobs.append(Job(ids, adapter, cfg, base_seed + index, c.logprobs, sink))
                self.texts.append(TextDecoder(c.stop))
        self.tokens = [0] * len(self.jobs)
        self.logprobs = [self.logprobs_kind() for _ in self.jobs]
        engine.submit(*self.jobs)

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish_reason once it ends), until every choice has ended."""
        open_choices = set(range(len(self.jobs)))
        status = 499  # unless every choice ends: the client went away
        try:
            while open_choices:
                index, kind, value = await self.queue.get()
                if index not in open_choices:
                    continue
                text = self.texts[index]
                if kind == "error":
                    status = 500
                    raise ApiError(500, f"generation failed: {value}", kind="server_error", code="generation_failed")
                if kind == "token":
                    token, lp, top = value
                    self.recorder.token()
                    self.tokens[index] += 1
                    piece = text.add(token)
                    self.logprobs[index].add(token, lp, top)
                    if text.stopped:  # a stop string: this choice ends here
                        self.engine.cancel(self.jobs[index])
                        open_choices.discard(index)
                        yield index, piece + text.finish(), "stop"
                    elif piece:
                        yield index, piece, None
                else:
                    open_choices.discard(index)
                    yield index, text.finish(), "stop" if text.stopped else value
            status = 200
        finally:
            for index in open_choices:  # the client went away, or an error: free the slots
                self.engine.cancel(self.jobs[index])
            self.recorder.done(status, sum(len(ids) for ids in self.prompts) * self.c.n, sum(self.tokens))

    def logprobs_kind(self) -> "Logprobs":
        return Logprobs()

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prompts) * self.c.n
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chunk(self, choices: list[dict]) -> dict[str, Any]:
        # which adapter version answered (a watched run's step): OpenAI's system_fingerprint
        served = self.jobs[0].served if self.jobs else None
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.c.model,
                "system_fingerprint": served.fingerprint if served else self.c.model, "choices": choices}

    async def whole(self) -> dict[str, Any]:
        texts = [""] * len(self.jobs)
        reasons: list[str | None] = [None] * len(self.jobs)
        async for index, piece, reason in self.events():
            texts[index] += piece
            reasons[index] = reason or reasons[index]
        choices = [self._choice(i, texts[i], reasons[i]) for i in range(len(self.jobs))]
        return {**self._chunk(choices), "usage": self._usage()}

    def _choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """One whole choice of the answer."""
        return {"text": text, "index": index, "finish_reason": reason,
                "logprobs": self.logprobs[index].body() if self.c.logprobs is not None else None}

    async def stream(self) -> AsyncIterator[str]:
        usage = {"usage": None} if self.c.include_usage else {}
        try:
            async for index, piece, reason in self.events():
                logprobs = self.logprobs[index].take() if self.c.logprobs is not None else None
                choice = {"text": piece, "index": index, "finish_reason": reason, "logprobs": logprobs}
                yield f"data: {json.dumps({**self._chunk([choice]), **usage})}\n\n"
            if self.c.include_usage:  # OpenAI's stream_options: one last chunk, no choices, the counts
                yield f"data: {json.dumps({**self._chunk([]), 'usage': self._usage()})}\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"


class Recorder:
    """One request's figures for /metrics: its first token's time, its end, its tokens."""

    def __init__(self, metrics: Metrics, model: str, arrived: float) -> None:
        self.metrics, self.model, self.arrived, self.first = metrics, model, arrived, True

    def token(self) -> None:
        if self.first:
            self.first = False
            self.metrics.ttft.labels(self.model).observe(time.perf_counter() - self.arrived)

    def done(self, status: int, prompt_tokens: int, generated: int) -> None:
        m = self.metrics
        m.requests.labels(self.model, str(status)).inc()
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(generated)
        if status == 200:
            m.latency.labels(self.model).observe(time.perf_counter() - self.arrived)


class Logprobs:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.offsets: list[int] = []
        self.raw: list[bytes] = []  # each token's bytes (a token may hold part of a character)
        self.top_raw: list[list[tuple[str, float, bytes]]] = []
        self._offset = 0
        self._taken = 0  # entries already sent in a streamed chunk

    def add(self, token: int, lp: float | None, top: dict[int, float] | None) -> None:
        if lp is None:
            return
        enc = tokenizer.get_encoding()
        raw = enc.decode_single_token_bytes(token)
        text = raw.decode("utf-8", errors="replace")
        self.tokens.append(text)
        self.raw.append(raw)
        self.token_logprobs.append(lp)
        alternatives = [(enc.decode_single_token_bytes(t), v) for t, v in (top or {}).items()]
        self.top.append({b.decode("utf-8", errors="replace"): v for b, v in alternatives})
        self.top_raw.append([(b.decode("utf-8", errors="replace"), v, b) for b, v in alternatives])
        self.offsets.append(self._offset)
        self._offset += len(text)

    def body(self, start: int = 0) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}

    def take(self) -> dict[str, Any]:
        """The tokens since the last streamed chunk (held-back text carries its tokens to the chunk that shows it)."""
        start, self._taken = self._taken, len(self.tokens)
        return self.body(start)


class ChatRun(CompletionRun):
    """One chat completions request: n choices of one conversation, each ending where the
    assistant's turn ends (<|endoftext|>, which the template closes every turn with)."""

    id_prefix, object = "chatcmpl-", "chat.completion"
    stop_token = tokenizer.EOT_ID

    def logprobs_kind(self) -> "Logprobs":
        return ChatLogprobs()

    def _choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self.logprobs[index].body() if self.c.logprobs is not None else None,
                "finish_reason": reason}

    async def stream(self) -> AsyncIterator[str]:
        usage = {"usage": None} if self.c.include_usage else {}
        chunk = {**self._chunk([]), "object": "chat.completion.chunk"}

        def line(choice: dict) -> str:
            return f"data: {json.dumps({**chunk, 'choices': [choice], **usage})}\n\n"

        try:
            for i in range(len(self.jobs)):  # OpenAI's first chunk of a choice names the role
                yield line({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})
            async for index, piece, reason in self.events():
                logprobs = self.logprobs[index].take() if self.c.logprobs is not None else None
                if piece or logprobs and logprobs["content"]:
                    yield line({"index": index, "delta": {"content": piece}, "logprobs": logprobs,
                                "finish_reason": None})
                if reason is not None:
                    yield line({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
            if self.c.include_usage:
                yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': self._usage()})}\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"


class ChatLogprobs(Logprobs):
    """OpenAI's chat logprobs: `content`, one entry per token with its bytes and top alternatives."""

    def body(self, start: int = 0) -> dict[str, Any]:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(b),
                             "top_logprobs": [{"token": tt, "logprob": v, "bytes": list(tb)} for tt, v, tb in top]}
                            for t, lp, b, top in zip(self.tokens[start:], self.token_logprobs[start:],
                                                     self.raw[start:], self.top_raw[start:])],
                "refusal": None}
