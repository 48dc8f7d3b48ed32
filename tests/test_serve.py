"""`lora-gpt2 serve`: OpenAI's completions API over one base model and many adapters, tested
with the official `openai` client and raw HTTP, against a server on 127.0.0.1."""

import signal
import subprocess
import threading
import time

import pytest
import torch

from lora_gpt2 import tokenizer

from helpers import ROOT, cli_command, subprocess_env
from serving import KEY, free_port, greedy_text  # the world and server fixtures: tests/serving.py

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_base_and_every_adapter(client):
    assert [m.id for m in client.models.list().data] == ["tiny-base", "poems", "plays"]


def test_health_counts_the_adapters_and_their_memory(server, world):
    import httpx

    from lora_gpt2.adapters.lora import lora_parameters

    _, _, singles = world
    health = httpx.get(server[0] + "/health", timeout=10).json()  # no key needed: for load balancers
    own = {n: sum(p.numel() * 4 for p in lora_parameters(singles[n]).values()) for n in ("poems", "plays")}
    assert health["status"] == "ok" and health["adapters"] == 2
    # The two adapters target different modules, so each module's stack holds 3 rows (the base's,
    # then each adapter's, zero where it has nothing there) and one float32 scaling per row:
    # 2 blocks x (qkv, output) + lm_head for poems, 2 blocks x (linear_in, linear_out) for plays
    assert health["adapter_bytes"] == 3 * sum(own.values()) + 3 * 4 * (2 * 2 + 1 + 2 * 2)


@pytest.mark.parametrize("name", [None, "poems", "plays"])
def test_greedy_completions_equal_generate(client, world, name):
    _, _, singles = world
    got = client.completions.create(model=name or "tiny-base", prompt="The quick brown", max_tokens=12,
                                    temperature=0)
    assert got.choices[0].text == greedy_text(singles, name, "The quick brown", 12)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == 3 and got.usage.completion_tokens == 12 and got.usage.total_tokens == 15


def test_streaming_gives_the_same_text_in_openai_chunks(client, world):
    _, _, singles = world
    pieces, reasons = [], []
    for chunk in client.completions.create(model="poems", prompt="Once upon", max_tokens=15, temperature=0,
                                           stream=True):
        assert chunk.object == "text_completion" and chunk.model == "poems"
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == greedy_text(singles, "poems", "Once upon", 15)
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_concurrent_requests_for_different_adapters_are_each_exact(server, world):
    """Requests for both adapters and the base at once share batches; each equals `generate`."""
    _, _, singles = world
    jobs = [(name, prompt) for name in (None, "poems", "plays") for prompt in ("Hello there", "In the")]
    results = {}

    def ask(name, prompt):
        c = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        results[(name, prompt)] = c.completions.create(model=name or "tiny-base", prompt=prompt, max_tokens=20,
                                                       temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {(n, p): greedy_text(singles, n, p, 20) for n, p in jobs}


def test_seeded_samples_n_and_a_prompt_list(client):
    kwargs = dict(model="plays", prompt=["A", "B"], max_tokens=8, temperature=1.0, n=2, seed=5)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) == 4


def test_one_request_holds_at_most_the_readmes_64_completions(client):
    """The README's limit and the code's are one number: n alone may reach it, prompts x n too."""
    import re

    from lora_gpt2.serve.request import MAX_CHOICES

    readme = (ROOT / "README.md").read_text()
    assert f"at most {MAX_CHOICES} completions" in " ".join(readme.split())
    assert len(client.completions.create(model="plays", prompt="A", max_tokens=1, n=64).choices) == 64
    assert len(client.completions.create(model="plays", prompt=["A", "B"], max_tokens=1, n=32).choices) == 64
    with pytest.raises(openai.BadRequestError, match=re.escape("n: must be between 1 and 64, got 65")):
        client.completions.create(model="plays", prompt="A", max_tokens=1, n=65)
    with pytest.raises(openai.BadRequestError, match=re.escape("3 prompts x n 22 is more than 64 completions")):
        client.completions.create(model="plays", prompt=["A", "B", "C"], max_tokens=1, n=22)


def test_stop_strings_end_the_text_before_them(client, world):
    _, _, singles = world
    full = greedy_text(singles, "poems", "The quick brown", 30)
    stop = full[10:14]
    assert stop and full.index(stop) >= 1
    got = client.completions.create(model="poems", prompt="The quick brown", max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="poems", prompt="The quick brown", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == full[: full.index(stop)]


def test_logprobs_are_the_models_own(client, world):
    _, _, singles = world
    got = client.completions.create(model="plays", prompt="The quick brown", max_tokens=3, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    ids = tokenizer.encode("The quick brown")
    with torch.inference_mode():
        first = torch.log_softmax(singles["plays"](torch.tensor([ids]))[0, -1].float(), -1)
    assert lp.token_logprobs[0] == pytest.approx(first.max().item(), abs=1e-4)
    assert len(lp.tokens) == 3 and all(len(top) == 2 for top in lp.top_logprobs)


@pytest.mark.parametrize("kwargs, error, param", [
    (dict(model="nope"), "NotFoundError", "model"),
    (dict(temperature=3.5), "BadRequestError", "temperature"),
    (dict(max_tokens=-1), "BadRequestError", "max_tokens"),
    (dict(n=0), "BadRequestError", "n"),
    (dict(max_tokens=100000), "BadRequestError", "max_tokens"),
    (dict(prompt=["x"] * 40, n=2), "BadRequestError", "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "BadRequestError", "stop"),
    (dict(top_p=1.5), "BadRequestError", "top_p"),
    (dict(seed=-1), "BadRequestError", "seed"),
    (dict(logprobs=6), "BadRequestError", "logprobs"),
    (dict(prompt=[]), "BadRequestError", "prompt"),
])
def test_bad_requests_are_the_clients_exceptions(client, kwargs, error, param):
    args = {"model": "poems", "prompt": "x", "max_tokens": 4, **kwargs}
    with pytest.raises(getattr(openai, error)) as caught:
        client.completions.create(**args)
    assert caught.value.body["param"] == param and param in caught.value.body["message"]


def test_a_missing_or_wrong_key_is_401(server):
    import httpx

    c = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    missing = httpx.get(server[0] + "/v1/models", timeout=10)  # no Authorization header at all
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


def raw(server, body: bytes, content_type="application/json", key=KEY):
    import httpx

    headers = {"content-type": content_type, "authorization": f"Bearer {key}"}
    return httpx.post(server[0] + "/v1/completions", content=body, headers=headers, timeout=30)


def test_raw_http_errors_keep_openais_shape(server):
    import httpx

    cases = [(raw(server, b"{not json"), 400, "invalid_json"),
             (raw(server, b'{"model": "poems"}', content_type="text/plain"), 415, "unsupported_media_type"),
             (raw(server, b'{"model": "poems", "prompt": "' + b"a" * (2 << 20) + b'"}'), 413, "body_too_large"),
             (raw(server, b"[1, 2]"), 400, "invalid_json"),
             (raw(server, b'{"model": "poems", "prompt": "x", "echo": true}'), 400, "unsupported")]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    assert httpx.get(server[0] + "/health", timeout=10).json()["status"] == "ok"


def test_pathological_json_bodies_get_400_and_the_log_stays_clean(server, caplog):
    """Valid JSON, hostile shape: 50,000 nested lists as the prompt, an unknown field 50,000
    objects deep, a 5,000-digit integer in a field, and a 4,000-digit one (Python reads it, so the
    message must not repeat it whole)."""
    import logging

    import httpx

    caplog.set_level(logging.WARNING)
    head = b'{"model": "poems", '
    cases = [(head + b'"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json"),
             (head + b'"prompt": "x", "extra": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", "invalid_json"),
             (head + b'"prompt": "x", "max_tokens": ' + b"7" * 5_000 + b"}", "invalid_json"),
             (head + b'"prompt": "x", "seed": ' + b"7" * 4_000 + b"}", "invalid_value")]
    for body, code in cases:
        response = raw(server, body)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == code and len(error["message"]) < 300, error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
    assert httpx.get(server[0] + "/health", timeout=10).json()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    import httpx

    base, engine = server
    body = {"model": "plays", "prompt": "x", "max_tokens": 400, "temperature": 0, "stream": True}
    chunks = 0
    with httpx.stream("POST", base + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                assert engine.active == 1  # still generating its 400 tokens
                break  # one chunk, then the client goes away
    assert chunks == 1
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0


def start_serving(base, adapters, *more):
    """`lora-gpt2 serve` in its own process, once it answers /health: (process, base URL)."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(cli_command("serve", "--model", base, "--adapters", adapters, "--port", port,
                                        "--device", "cpu", *more),
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def in_flight(url, body):
    """A request on its own thread, returned once the server counts it active: (thread, result)."""
    import httpx

    result = {}

    def ask():
        try:
            result["r"] = httpx.post(url + "/v1/completions", timeout=60, json=body)
        except httpx.HTTPError as exc:
            result["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.time() + 30
    while httpx.get(url + "/health", timeout=5).json()["active_requests"] == 0:
        assert time.time() < deadline and asker.is_alive(), "the request never became active"
        time.sleep(0.01)
    return asker, result


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(world):
    import httpx

    base, adapters, singles = world
    proc, url = start_serving(base, adapters)
    try:
        asker, result = in_flight(url, {"model": "poems", "prompt": "Hello", "max_tokens": 500, "temperature": 0})
        proc.send_signal(signal.SIGTERM)
        refused = None
        while asker.is_alive() and refused is None:  # while draining, no new request is taken
            try:
                httpx.get(url + "/health", timeout=5)
            except httpx.ConnectError:
                refused = asker.is_alive()
        asker.join(60)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert refused is True, "a new connection was still accepted while the last request drained"
    assert result["r"].status_code == 200
    assert result["r"].json()["choices"][0]["text"] == greedy_text(singles, "poems", "Hello", 500)
    assert "serving tiny-base + plays, poems on" in err and err.strip().endswith("stopped")


@pytest.mark.parametrize("how", ["a second Ctrl-C", "the end of --grace"])
def test_stopping_at_once_cuts_off_what_is_left_cleanly(world, how):
    base, adapters, _ = world
    second = how == "a second Ctrl-C"
    proc, url = start_serving(base, adapters, *(() if second else ("--grace", "1")))
    try:  # 16 completions of 500 tokens: far longer than the few seconds this test allows
        asker, result = in_flight(url, {"model": "poems", "prompt": "Hello", "max_tokens": 500, "n": 16})
        began = time.monotonic()
        proc.send_signal(signal.SIGINT if second else signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None and asker.is_alive()  # the first signal drains
        if second:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - began
        asker.join(30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0 and (took < 10 if second else 1.0 <= took < 10), (took, err)
    assert "r" not in result or result["r"].status_code != 200  # cut off, not completed
    assert err.strip().endswith("stopped; 16 unfinished completion(s) cut off") and "Traceback" not in err, err


def test_serve_refuses_bad_adapter_specs(cli, tmp_path):
    code, _, err = cli("serve", "--adapter", "poems")
    assert code == 1 and err.strip() == "lora-gpt2: error: --adapter must be NAME=PATH, got 'poems'"
    code, _, err = cli("serve", "--adapters", str(tmp_path / "none"))
    assert code == 1 and "is not a folder" in err
    code, _, err = cli("serve", "--adapter", "poems=/nowhere", "--kv-cache", "flat")
    assert code == 1 and err.strip() == "lora-gpt2: error: --kv-cache must be one of paged, rows, got 'flat'"


def test_a_taken_port_is_one_line_before_anything_loads(cli):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # the model does not exist either: the port is checked first, so nothing is loaded in vain
        code, _, err = cli("serve", "--model", "/no/such/model", "--port", str(port))
    assert code == 1 and err.strip() == f"lora-gpt2: error: cannot serve on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("every_shape_blocked", [False, True], ids=["today", "as-0.2"])
def test_memory_stays_flat_as_prompts_of_new_lengths_arrive(tmp_path, every_shape_blocked, monkeypatch):
    """What `serve` runs (the bank, the decode-time layout, the engine), fed 500 prompts of distinct
    lengths: RSS after 500 stays within 25 MB of RSS after 50. With prefills of every length sent to
    oneDNN's blocked path (0.2's way, the second case) it grows by more than 100 MB, which the probe
    must see."""
    import random
    import threading

    from lora_gpt2 import load_pretrained
    from lora_gpt2.adapters.lora import lora_parameters
    from lora_gpt2.config import LoRAConfig
    from lora_gpt2.inference import layouts
    from lora_gpt2.inference.bank import AdapterBank
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.layouts import DecodeLayout
    from lora_gpt2.serve.engine import Engine, Job

    from helpers import make_hf_model, randomize_adapters, save_hf_model

    if every_shape_blocked:
        monkeypatch.setattr(layouts, "blocked_rows", lambda x: 0)
    base = save_hf_model(make_hf_model(seed=3, n_embd=128, n_layer=2, n_positions=1024), tmp_path / "base")
    bank = AdapterBank(load_pretrained(base, lora=LoRAConfig(targets=())).eval())
    adapter = randomize_adapters(load_pretrained(base, lora=LoRAConfig(targets=("attn",), r=4)), seed=1, scale=0.05)
    bank.add("a", LoRAConfig(targets=("attn",), r=4), {k: v.detach() for k, v in lora_parameters(adapter).items()})

    def rss_mb() -> float:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024

    lengths = random.Random(0).sample(range(1, 1000), 500)
    done, seen = threading.Semaphore(0), {}
    with DecodeLayout(bank.model):
        engine = Engine(bank, max_batch=4).start()
        try:
            for i, n in enumerate(lengths):
                engine.submit(Job(list(range(n)), "a" if i % 2 else None, SamplingConfig(max_new_tokens=1), i, None,
                                  lambda kind, _: done.release() if kind != "token" else None))
                assert done.acquire(timeout=60)
                if i + 1 in (50, 500):
                    seen[i + 1] = rss_mb()
        finally:
            engine.stop()
    growth = seen[500] - seen[50]
    if every_shape_blocked:
        assert growth > 100, seen  # the probe sees what 0.2 did, so the bound below means something
    else:
        assert growth < 25, seen
