"""`lora-gpt2 serve` under load and misuse, on 127.0.0.1: a bounded load test where every response
is checked, slow clients that must not hold up the others, and streams that carry logprobs and
usage the way OpenAI's do."""

import contextlib
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving import BODY_TIMEOUT_S, KEY, greedy_text

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

AUTH = {"authorization": f"Bearer {KEY}"}
MODELS = ("tiny-base", "poems", "plays")


def adapter_of(model: str) -> str | None:
    return None if model == "tiny-base" else model


def sse(response: httpx.Response) -> list[dict]:
    """A streamed response's events, checking the framing: `data: ` lines, blank-line separated, [DONE] last."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    assert all(e.startswith("data: {") for e in events[:-2])
    return [json.loads(e[len("data: "):]) for e in events[:-2]]


def test_streamed_chunks_carry_their_tokens_logprobs(server):
    base, _ = server
    body = {"model": "poems", "prompt": "The quick brown", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    whole = httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=60).json()["choices"][0]
    chunks = sse(httpx.post(base + "/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60))
    streamed = {k: [v for c in chunks for v in c["choices"][0]["logprobs"][k]] for k in whole["logprobs"]}
    assert streamed["tokens"] == whole["logprobs"]["tokens"] and len(streamed["tokens"]) == 12
    assert streamed["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    assert streamed["text_offset"] == whole["logprobs"]["text_offset"]
    assert [set(t) for t in streamed["top_logprobs"]] == [set(t) for t in whole["logprobs"]["top_logprobs"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    for chunk in chunks:  # each chunk's tokens are the text it shows (no stop strings, so nothing held back)
        assert "".join(chunk["choices"][0]["logprobs"]["tokens"]) == chunk["choices"][0]["text"]


def test_stream_options_include_usage_adds_a_last_chunk(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    chunks = list(client.completions.create(model="plays", prompt=["A", "Bb"], n=2, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == 2 * (1 + 2) and last.usage.total_tokens == 26
    assert all(c.usage is None for c in text_chunks) and {c.choices[0].index for c in text_chunks} == {0, 1, 2, 3}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="plays", prompt="A", stream_options={"include_usage": True})
    assert caught.value.body["param"] == "stream_options"


def complete(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(sep and length and len(body) >= length[0])


def slow_client(port: int, results: list, index: int, stop: threading.Event) -> None:
    """Sends its headers, then one byte of a 200-byte body every 0.2 s: a slow-loris client."""
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S * 4) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 200\r\n\r\n{")
        s.settimeout(0.2)
        reply = b""
        while not stop.is_set() and not complete(reply):
            try:
                if not reply:  # trickle until the server answers
                    s.sendall(b" ")
                chunk = s.recv(65536)
                if not chunk:  # the server closed the connection
                    break
                reply += chunk
            except socket.timeout:
                continue
            except OSError:
                break
        results[index] = reply


def test_slow_clients_do_not_hold_up_the_others_and_are_cut_off(server, world):
    base, engine = server
    _, _, singles = world
    port = int(base.rsplit(":", 1)[1])
    stop = threading.Event()
    results: list = [b""] * 8
    slow = [threading.Thread(target=slow_client, args=(port, results, i, stop)) for i in range(8)]
    for t in slow:
        t.start()
    try:
        time.sleep(0.5)  # every slow client is connected and trickling
        began = time.monotonic()
        got = httpx.post(base + "/v1/completions", headers=AUTH, timeout=60,
                         json={"model": "poems", "prompt": "Hello there", "max_tokens": 16, "temperature": 0})
        took = time.monotonic() - began
        assert got.status_code == 200 and got.json()["choices"][0]["text"] == greedy_text(singles, "poems",
                                                                                          "Hello there", 16)
        assert took < BODY_TIMEOUT_S / 2, f"a normal request waited {took:.1f} s behind slow clients"
        assert all(t.is_alive() for t in slow)  # they were still trickling all along
        for t in slow:
            t.join(BODY_TIMEOUT_S * 3)
    finally:
        stop.set()
    for reply in results:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(body)["error"]["code"] == "request_timeout"
    assert engine.active == 0


def test_bounded_load_every_response_is_well_formed_and_exact(server, world):
    """96 requests from 12 clients over the base and both adapters: greedy ones equal `generate`,
    seeded ones are asked twice and agree up to float rounding whatever else shared their batches;
    none fails."""
    base, engine = server
    _, _, singles = world
    rng = random.Random(7)
    prompts = ["Hello", "The quick brown", "In the beginning", "Once", "A B C"]
    requests, bodies = [], {}
    for i in range(48):
        body = {"model": rng.choice(MODELS), "prompt": rng.choice(prompts), "max_tokens": rng.randint(1, 24),
                "stream": rng.random() < 0.5, "logprobs": 0}
        if i % 2:
            body.update(temperature=0.9, top_p=0.95, seed=rng.randrange(1000), n=rng.randint(1, 3))
        else:
            body.update(temperature=0)
        bodies[i] = body
        requests += [(i, body), (i, dict(body, stream=not body["stream"]))]  # each asked twice, both ways
    rng.shuffle(requests)

    def ask(item):
        i, body = item
        with httpx.Client(base_url=base, headers=AUTH, timeout=120) as client:
            response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if not body["stream"]:
            return i, response.json()["choices"], response.json()["usage"]
        chunks = sse(response)
        n = body.get("n", 1)
        texts, reasons, tokens, lps = [""] * n, [None] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        for chunk in chunks:
            assert chunk["id"] == chunks[0]["id"] and chunk["id"].startswith("cmpl-")
            assert chunk["object"] == "text_completion" and chunk["model"] == body["model"]
            (choice,) = chunk["choices"]
            assert reasons[choice["index"]] is None  # nothing after a choice's finish
            texts[choice["index"]] += choice["text"]
            tokens[choice["index"]] += choice["logprobs"]["tokens"]
            lps[choice["index"]] += choice["logprobs"]["token_logprobs"]
            reasons[choice["index"]] = choice["finish_reason"]
        return i, [{"index": j, "text": texts[j], "finish_reason": reasons[j], "logprobs": {"tokens": tokens[j], "token_logprobs": lps[j]}}
                   for j in range(n)], None

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, requests))
    seen: dict[int, list] = {}
    for i, choices, usage in answers:
        body = bodies[i]
        n, max_tokens = body.get("n", 1), body["max_tokens"]
        assert [c["index"] for c in choices] == list(range(n))
        for c in choices:
            assert c["finish_reason"] == "length" and len(c["logprobs"]["tokens"]) == max_tokens
        if usage is not None:
            assert usage["completion_tokens"] == n * max_tokens
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        if body["temperature"] == 0:
            assert [c["text"] for c in choices] == [greedy_text(singles, adapter_of(body["model"]), body["prompt"],
                                                                max_tokens)]
        seen.setdefault(i, []).append([c["logprobs"] for c in choices])
    assert len(answers) == 96
    same = 0
    for first, second in seen.values():  # one seeded request, answered in two different batches
        for a, b in zip(first, second):
            assert a["tokens"][0] == b["tokens"][0]  # the first token comes from the request's own prefill
            common = next((k for k, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
            # up to where they part, the same computation: the logprobs agree to float rounding
            assert a["token_logprobs"][:common] == pytest.approx(b["token_logprobs"][:common], abs=1e-4)
            same += a["tokens"] == b["tokens"]
    # This random model's distributions are nearly flat over 50,257 tokens, so a batch's float rounding
    # (a GEMM with more rows sums in another order) can move a draw across a token boundary; most pairs agree
    assert same >= 0.8 * sum(len(f) for f, _ in seen.values())
    assert engine.active == 0 and httpx.get(base + "/health", timeout=10).json()["status"] == "ok"


def exchange(port: int, data: bytes, then: bytes = b"", wait: float = 0.0, timeout: float = BODY_TIMEOUT_S * 3):
    """Send raw bytes (and, after `wait` seconds, more), read until the server closes: (reply, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if then:
            time.sleep(wait)
            with contextlib.suppress(OSError):
                s.sendall(then)
        reply, closed = b"", False
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            reply += chunk
        return reply, closed


def openai_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


def test_errors_below_the_routes_are_openais_shape_and_close(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    cases = [
        (b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
        (b"DELETE /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 405, "method_not_allowed"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400, "invalid_http"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(2_000)) + b"\r\n",
         431, "headers_too_large"),
    ]
    for request, status, code in cases:
        reply, closed = exchange(port, request)
        got, error = openai_error(reply)
        assert (got, error["code"]) == (status, code), reply[:300]
        if status != 404 and status != 405:
            assert closed  # a connection that spoke bad HTTP is not kept
    assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"


def test_slow_headers_get_408_and_every_408_closes_the_connection(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    start = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S * 3) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        reply = b""
        while True:  # one header byte every 0.2 s, never finishing the header block
            try:
                s.sendall(b"X")
            except OSError:
                break
            s.settimeout(0.2)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:  # the server closed its side after its reply
                break
            reply += chunk
        took = time.time() - start
    status, error = openai_error(reply)
    assert (status, error["code"]) == (408, "request_timeout") and "headers" in error["message"]
    assert BODY_TIMEOUT_S * 0.9 < took < BODY_TIMEOUT_S * 2
    body = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer " + \
        KEY.encode() + b"\r\nContent-Length: 200\r\n\r\n{"
    reply, closed = exchange(port, body)  # headers in time, the body never
    status, error = openai_error(reply)
    assert (status, error["code"], closed) == (408, "request_timeout", True)


def test_a_plain_request_whose_client_left_is_cancelled(server):
    base, engine = server
    body = {"model": "plays", "prompt": "x", "max_tokens": 480, "temperature": 1.0, "n": 32}
    start = time.time()
    whole = httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=120)
    alone = time.time() - start
    assert whole.status_code == 200 and alone > 1.0, alone  # long enough to tell a cancel from the end
    left = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=0.3)
    while engine.active and time.time() - left < alone:
        time.sleep(0.02)
    freed = time.time() - left
    assert engine.active == 0 and freed < alone / 2, (freed, alone)
