"""The HTTP layer: OpenAI's `/v1/models`, `/v1/completions` and `/v1/chat/completions` (plain
and streamed), vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (with
--allow-runtime-adapters), `/health`, Prometheus' `/metrics`, and the playground page at `/`.

Every request is checked before it reaches the engine; every error is OpenAI's JSON shape with
its status. A streamed request whose client goes away is cancelled, freeing its batch slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request  # the serve extra; this module is imported only by `serve`
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import tokenizer
from ..chat_template import ChatTemplate
from ..checkpoints.reading import read_adapter
from ..errors import CheckpointError, DataError
from ..inference.decoding import fits
from .adapters import check_name
from .engine import Engine
from .metrics import CONTENT_TYPE, Metrics
from .request import REST, ApiError, Completion, parse_chat, parse_completion, shown
from .runs import ChatRun, CompletionRun, Recorder

MAX_BODY_BYTES = 1 << 20  # a 1 MB request body is far beyond any GPT-2 prompt
DISCONNECT_POLL_S = 0.25  # how often a plain (not streamed) request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    base_name: str  # what /v1/models calls the base model
    api_key: str | None = None
    body_timeout_s: float = 30.0  # a body trickled slower than this is refused (408): a slow client's slot frees
    allow_runtime_adapters: bool = False  # vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING
    weights: dict | None = None  # the base model's decode-time copies (DecodeLayout.describe)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="lora-gpt2", docs_url=None, redoc_url=None, openapi_url=None)
    model = engine.bank.model
    context = model.config.n_positions
    metrics = Metrics(engine)

    def error(exc: ApiError) -> JSONResponse:
        # a client too slow to send its request is not kept: it may trickle on forever otherwise
        headers = {"Connection": "close"} if exc.status == 408 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # no route, or not this method
        what = {404: f"there is no {request.url.path!r} here (see /v1/models, /v1/completions, "
                     "/v1/chat/completions, /health)",
                405: f"{request.url.path} does not take {request.method}"}.get(exc.status_code, str(exc.detail))
        return error(ApiError(exc.status_code, what, code={404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code)))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def names() -> list[str]:
        return [settings.base_name, *engine.adapters.current]

    def label(name: Any) -> str:  # a metrics label: only names the server answers for
        return name if isinstance(name, str) and name in names() else "unknown"

    async def body_of(request: Request) -> Any:
        try:
            return await asyncio.wait_for(_read_json(request), settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body took more than {settings.body_timeout_s:g} s to arrive",
                           code="request_timeout") from None

    page = resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():  # static and secret-free: the page asks for the key itself when one is needed
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        current = engine.adapters.current
        return {"status": "ok", "active_requests": engine.active, "adapters": len(current),
                "adapter_bytes": engine.bank.nbytes, "kv_cache": engine.kv.describe(), "served": {n: s.describe() for n, s in current.items()},
                "watched": engine.adapters.watching, "runtime_adapters": settings.allow_runtime_adapters,
                "weights": settings.weights}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        current = engine.adapters.current
        base = {"id": settings.base_name, "object": "model", "created": 0, "owned_by": "lora-gpt2",
                "root": settings.base_name, "parent": None}
        return {"object": "list", "data": [base] + [
            {"id": n, "object": "model", "created": 0, "owned_by": "lora-gpt2", "root": s.path,
             "parent": settings.base_name, "lora_gpt2": s.describe()} for n, s in current.items()]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def runtime_on(request: Request) -> None:
        check_key(request)
        if not settings.allow_runtime_adapters:  # as vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING: no such route
            raise ApiError(404, f"{request.url.path} is off; start serve with --allow-runtime-adapters to load and "
                           "unload adapters at run time", code="not_found")

    def named(body: Any, *keys: str) -> list[str]:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_value")
        for key in keys:
            if not isinstance(body.get(key), str) or not body[key]:
                raise ApiError(400, f"{key}: required, a non-empty string", param=key, code="invalid_value")
        return [body[key] for key in keys]

    def changed(event: str, message: str) -> PlainTextResponse:  # vLLM answers in plain text
        metrics.adapter_changes.labels(event).inc()
        return PlainTextResponse(message)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        runtime_on(request)
        name, path = named(await body_of(request), "lora_name", "lora_path")
        try:
            check_name(name, settings.base_name)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="lora_name", code="invalid_value") from None
        if name in engine.adapters.current or name in engine.adapters.watching:
            raise ApiError(400, f"the adapter name {name!r} is taken; unload it first or choose another",
                           param="lora_name", code="adapter_exists")
        try:  # disk and sha256 off the event loop and off the decoding thread
            adapter = await asyncio.to_thread(read_adapter, path)
            await asyncio.wrap_future(engine.call(lambda: engine.adapters.add(name, adapter)))
        except (CheckpointError, ValueError, OSError) as exc:
            raise ApiError(400, f"cannot load {shown(path, 200)}: {' '.join(str(exc).split())}", param="lora_path",
                           code="invalid_adapter") from None
        return changed("load", f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        runtime_on(request)
        (name,) = named(await body_of(request), "lora_name")
        served = engine.adapters.current.get(name)
        if served is None:
            raise ApiError(404, f"the adapter {shown(name)} is not loaded; served: {', '.join(names())}",
                           param="lora_name", code="model_not_found")
        if served.watched:
            raise ApiError(400, f"the adapter {name!r} follows the run {served.watched} (--watch); it cannot be "
                           "unloaded at run time", param="lora_name", code="adapter_watched")
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.adapters.remove(name)))
        except KeyError:  # unloaded by another request in the meantime
            raise ApiError(404, f"the adapter {shown(name)} is not loaded", param="lora_name",
                           code="model_not_found") from None
        return changed("unload", f"Success: LoRA adapter '{name}' removed successfully.")

    def chat_prompt(c: Completion, adapter: str | None) -> tuple[Completion, list[list[int]]]:
        """A chat request's prompt, rendered by its adapter's template (the default one for the
        base model and for adapters trained without one)."""
        served = engine.adapters.current.get(adapter) if adapter else None
        try:
            ids = (served.template if served else ChatTemplate()).prompt(list(c.messages))
        except DataError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages", code="invalid_value") from None
        if c.max_tokens == REST:
            c = dataclasses.replace(c, max_tokens=max(context - len(ids), 1))
        return c, [ids]

    async def answer(request: Request, chat: bool):
        arrived, model_name = time.perf_counter(), None
        try:
            check_key(request)
            body = await body_of(request)
            model_name = body.get("model") if isinstance(body, dict) else None
            c = (parse_chat if chat else parse_completion)(body, model.config.vocab_size)
            if c.model not in names():
                raise ApiError(404, f"the model {shown(c.model)} does not exist; served: {', '.join(names())}",
                               param="model", code="model_not_found")
            adapter = None if c.model == settings.base_name else c.model
            if chat:
                c, prompts = chat_prompt(c, adapter)
            else:
                prompts = [p if isinstance(p, list) else tokenizer.encode_prompt(p) for p in c.prompts]
            for ids in prompts:  # refused here, with OpenAI's code, before anything is queued
                if not fits(len(ids), c.max_tokens, context):
                    raise ApiError(400, f"the prompt's {len(ids)} tokens + max_tokens {c.max_tokens} are more than "
                                   f"the model's context of {context}", param="max_tokens",
                                   code="context_length_exceeded")
        except ApiError as exc:
            metrics.requests.labels(label(model_name), str(exc.status)).inc()
            raise
        run = (ChatRun if chat else CompletionRun)(engine, c, adapter, prompts, Recorder(metrics, c.model, arrived))
        if c.stream:  # a stream whose client leaves is closed by Starlette, which frees the slots
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        return await _unless_gone(request, run.whole())

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


async def _unless_gone(request: Request, work) -> Any:
    """`work`'s result, or its cancellation (which frees its batch slots) once the client has gone."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return JSONResponse({}, status_code=499)  # nobody reads it: nginx's "client closed request"


async def _read_json(request) -> Any:
    kind = request.headers.get("content-type", "")
    if not kind.split(";")[0].strip().lower() == "application/json":
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got {kind or 'none'!r}",
                       code="unsupported_media_type")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is {int(size):,} bytes; at most {MAX_BODY_BYTES:,}", code="body_too_large")
    raw = b""
    async for chunk in request.stream():  # also bounds a body sent without a length
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is more than {MAX_BODY_BYTES:,} bytes", code="body_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:  # valid JSON, but nested deeper than Python's parser goes
        raise ApiError(400, "the body is nested too deeply to read", code="invalid_json") from None
    except ValueError as exc:  # an integer beyond Python's int-string limit (4,300 digits)
        raise ApiError(400, f"the body holds a number too long to read ({' '.join(str(exc).split())[:120]})",
                       code="invalid_json") from None
