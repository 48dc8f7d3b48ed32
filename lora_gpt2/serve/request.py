"""OpenAI completions and chat completions requests, checked field by field: every refusal
names its field."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..chat_template import message_list
from ..errors import DataError

MAX_CHOICES = 64  # prompts x n in one request (the README's number): a batch's worth, not a denial of service
MAX_LOGPROBS = 5
MAX_STOPS = 4
REST = -1  # a chat request's max_tokens when unset: whatever the context has room for
UNSUPPORTED = {"echo": False, "best_of": 1, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0,
               "logit_bias": None}  # accepted only at these values (OpenAI's defaults)
CHAT_UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
                    "tool_choice": None, "functions": None, "function_call": None, "audio": None,
                    "modalities": None, "prediction": None}


class ApiError(Exception):
    """An error in OpenAI's shape: status, message, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Completion:
    model: str
    prompts: list[str | list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    logprobs: int | None
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage counts
    messages: tuple = ()  # a chat request's conversation (its prompt is rendered by the adapter's template)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def shown(value: Any, limit: int = 80) -> str:
    """A client's value as an error message repeats it: at most `limit` characters, so a
    4,000-digit number or a megabyte string is named, not echoed."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, f"must be a number, got {shown(value)}")
    if not low <= value <= high:
        raise _bad(key, f"must be between {low:g} and {high:g}, got {shown(value)}")
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise _bad(key, f"must be between {low} and {high}, got {shown(value)}")
    return value


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [list(value)]  # one prompt as token ids
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(v, list) and v and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
        return [list(v) for v in value]
    raise _bad("prompt", "must be a string, a list of strings, or token ids (a list of integers, or of lists)")


def parse_completion(body: Any, vocab_size: int) -> Completion:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required: the base model's name or an adapter's")
    if "prompt" not in body:
        raise _bad("prompt", "is required")
    prompts = _prompts(body["prompt"])
    for prompt in prompts:
        if isinstance(prompt, list) and not all(0 <= t < vocab_size for t in prompt):
            raise _bad("prompt", f"token ids must be in [0, {vocab_size})")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOPS}, got {shown(stop)}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {shown(stream)}")
    include_usage = _stream_options(body.get("stream_options"), stream)
    for key, default in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != default and value != {}:
            raise ApiError(400, f"{key}: not supported by lora-gpt2 serve (only {default!r})", param=key,
                           code="unsupported")
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    if len(prompts) * n > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts x n {n} is more than {MAX_CHOICES} completions in one request")
    return Completion(
        model=model, prompts=prompts,
        max_tokens=_integer(body, "max_tokens", 16, 0, 1 << 20),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        n=n,
        stop=stops,
        seed=_integer(body, "seed", None, 0, 2**62),
        stream=stream,
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS),
        include_usage=include_usage,
    )


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise _bad("stream_options", "is only allowed with stream: true")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise _bad("stream_options", f"must be an object with only include_usage, got {shown(value)}")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options", f"include_usage must be true or false, got {shown(include)}")
    return include


def parse_chat(body: Any, vocab_size: int) -> Completion:
    """A chat completions request as a Completion of one prompt (rendered later, by the
    template of the adapter it names) with its `messages`; `max_tokens` unset is the rest of
    the context."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if "messages" not in body:
        raise _bad("messages", "is required")
    try:
        messages = message_list(body["messages"], "messages", training=False)
    except DataError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_value") from None
    for key, default in CHAT_UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != default and value != {} and value != []:
            raise ApiError(400, f"{key}: not supported by lora-gpt2 serve", param=key, code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported")
    limits = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    if len(set(map(repr, limits.values()))) > 1:
        raise _bad("max_tokens", "max_tokens and max_completion_tokens differ; give one")
    logprobs = body.get("logprobs", False)
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("logprobs", f"must be true or false in chat completions, got {shown(logprobs)}")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    plain = {k: v for k, v in body.items() if k in ("model", "temperature", "top_p", "n", "stop", "seed", "stream",
                                                      "stream_options")}
    limit = next((_integer(limits, k, None, 0, 1 << 20) for k in limits), None)
    c = parse_completion({**plain, "prompt": ""}, vocab_size)
    return replace(c, prompts=[], messages=tuple(messages), max_tokens=REST if limit is None else limit,
                   logprobs=(top or 0) if logprobs else None)
