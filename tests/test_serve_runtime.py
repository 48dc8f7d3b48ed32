"""`serve` changing its adapters while it decodes (vLLM's load/unload API), versions that in-flight
requests keep, and Prometheus' /metrics read back with Prometheus' own parser."""

import json
import queue
import shutil
import threading

import pytest

from lora_gpt2.checkpoints.reading import read_adapter

from helpers import make_adapter, make_hf_model, save_hf_model
from serving import KEY, base_engine, greedy_text, running_server

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def runtime(world):
    """A server with runtime adapters on, serving only the base model at first."""
    base, _, _ = world
    engine = base_engine(base).start()
    try:
        with running_server(engine, allow_runtime_adapters=True) as url:
            yield url, engine
    finally:
        engine.stop()


def post(url, path, body, headers=AUTH):
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def models(url):
    return [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"]]


def complete(url, model, prompt="The quick brown", n=12):
    r = post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    return r


def test_load_serve_and_unload_an_adapter(runtime, world):
    url, engine = runtime
    _, adapters, singles = world
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(adapters / "poems")})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'extra' added successfully."
    listed = httpx.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["tiny-base", "extra"]
    assert listed[1]["parent"] == "tiny-base" and listed[1]["lora_gpt2"]["step"] == 1
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    got = client.completions.create(model="extra", prompt="The quick brown", max_tokens=12, temperature=0)
    assert got.choices[0].text == greedy_text(singles, "poems", "The quick brown", 12)
    assert got.system_fingerprint == "extra@step-1"
    for name, message in (("extra", "the adapter name 'extra' is taken"),
                          ("tiny-base", "is the base model's name")):
        r = post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapters / "plays")})
        assert r.status_code == 400 and message in r.json()["error"]["message"]
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'extra' removed successfully."
    assert models(url) == ["tiny-base"]
    assert complete(url, "extra").json()["error"]["code"] == "model_not_found"
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert engine.bank.loaded == [] and engine.bank.stacks == {}  # the slot and its stacks are gone


def test_bad_loads_are_400_naming_the_file_and_change_nothing(runtime, world, tmp_path):
    url, _ = runtime
    base, adapters, singles = world
    truncated = tmp_path / "truncated"
    shutil.copytree(adapters / "poems", truncated)
    weights = truncated / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (tmp_path / "not-an-adapter.txt").write_text("hello")
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{not json")
    other_base = save_hf_model(make_hf_model(seed=99, n_positions=512), tmp_path / "other-base")
    other, _ = make_adapter(other_base, tmp_path / "other", ("qkv_projection",))
    cases = {str(tmp_path / "missing"): "does not exist",
             str(tmp_path / "not-an-adapter.txt"): "holds no adapter",
             str(truncated): f"{weights} does not match the sha256",
             str(peft): "adapter_config.json",
             str(other): "fingerprint"}
    for path, message in cases.items():
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["param"] == "lora_path", (path, error)
    for body, param in (({"lora_path": str(adapters / "poems")}, "lora_name"), ({"lora_name": "x"}, "lora_path"),
                        ({"lora_name": "a\nb", "lora_path": str(adapters / "poems")}, "lora_name")):
        r = post(url, "/v1/load_lora_adapter", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert models(url) == ["tiny-base"]
    assert complete(url, "tiny-base").json()["choices"][0]["text"] == greedy_text(singles, None, "The quick brown", 12)


def test_runtime_loading_is_off_by_default_and_the_key_applies(server, runtime, world):
    _, adapters, _ = world
    body = {"lora_name": "x", "lora_path": str(adapters / "poems")}
    r = post(server[0], "/v1/load_lora_adapter", body)
    assert r.status_code == 404 and "--allow-runtime-adapters" in r.json()["error"]["message"]
    r = post(server[0], "/v1/unload_lora_adapter", {"lora_name": "poems"})
    assert r.status_code == 404 and "poems" in models(server[0])
    r = post(runtime[0], "/v1/load_lora_adapter", body, headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert models(runtime[0]) == ["tiny-base"]


def _stream(url, model, n, first_token: threading.Event, out: dict):
    with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": model, "prompt": "Once upon", "max_tokens": n, "temperature": 0,
                            "stream": True}) as r:
        text, fingerprints = "", set()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                fingerprints.add(chunk["system_fingerprint"])
                first_token.set()
        out.update(text=text, fingerprints=fingerprints, status=r.status_code)


def test_a_stream_finishes_on_the_version_it_started_with(runtime, world):
    url, engine = runtime
    _, adapters, singles = world
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "v", "lora_path": str(adapters / "poems")})
    assert r.status_code == 200
    started, out = threading.Event(), {}
    streaming = threading.Thread(target=_stream, args=(url, "v", 150, started, out))
    streaming.start()
    assert started.wait(60)
    # a newer version under the same name (what --watch does), then the name unloaded, mid-stream
    plays = read_adapter(adapters / "plays")
    engine.call(lambda: engine.adapters.add("v", plays, replace_existing=True)).result(30)
    assert complete(url, "v").json()["choices"][0]["text"] == greedy_text(singles, "plays", "The quick brown", 12)
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "v"}).status_code == 200
    assert complete(url, "v").status_code == 404
    streaming.join(120)
    assert out["status"] == 200 and out["fingerprints"] == {"v@step-1"}
    assert out["text"] == greedy_text(singles, "poems", "Once upon", 150)
    engine.call(lambda: None).result(30)  # a step later, the retired versions are freed
    assert engine.bank.loaded == [] and engine.adapters.retired == []


def test_a_requests_choices_all_decode_with_one_version(world):
    """A change landing while a request's choices are queued (a watcher's thread calls the engine
    at any time: here, right after the request's first inbox item) gives every choice the same
    version, the one its system_fingerprint names; the next request sees the new one."""
    base, adapters, singles = world
    engine = base_engine(base)
    engine.adapters.add("v", read_adapter(adapters / "poems"))
    plays, changed = read_adapter(adapters / "plays"), []

    class ChangeAfterTheFirstSubmit(queue.SimpleQueue):
        def put(self, item, block=True, timeout=None):
            super().put(item)
            if item[0] == "submit" and not changed:
                changed.append(engine.call(lambda: engine.adapters.add("v", plays, replace_existing=True)))

    engine._inbox = ChangeAfterTheFirstSubmit()
    engine.start()
    try:
        with running_server(engine) as url:
            r = post(url, "/v1/completions", {"model": "v", "prompt": "The quick brown", "max_tokens": 12,
                                              "temperature": 0, "n": 3}).json()
            changed[0].result(30)
            after = complete(url, "v").json()
    finally:
        engine.stop()
    poems = greedy_text(singles, "poems", "The quick brown", 12)
    assert [c["text"] for c in r["choices"]] == [poems] * 3 and r["system_fingerprint"] == "v@step-1"
    assert after["choices"][0]["text"] == greedy_text(singles, "plays", "The quick brown", 12)
    assert after["system_fingerprint"] == "v@step-1"  # plays' checkpoint is also step 1: the text tells them apart


def test_200_load_unload_cycles_leave_memory_flat(runtime, world):
    url, engine = runtime
    _, adapters, _ = world

    def rss_mb() -> float:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024

    seen = {}
    for i in range(200):
        path = str(adapters / ("poems", "plays")[i % 2])
        assert post(url, "/v1/load_lora_adapter", {"lora_name": f"a{i}", "lora_path": path}).status_code == 200
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": f"a{i}"}).status_code == 200
        assert engine.bank.loaded == []  # freed before the unload is answered, not a step later
        if i + 1 in (20, 200):
            seen[i + 1] = rss_mb()
    assert engine.bank.names == [None] and engine.bank.stacks == {} and engine.bank.nbytes == 0
    assert seen[200] - seen[20] < 20, seen


def test_metrics_count_what_the_requests_did(world):
    from prometheus_client.parser import text_string_to_metric_families

    base, adapters, _ = world
    engine = base_engine(base)
    engine.adapters.add("poems", read_adapter(adapters / "poems"))
    engine.start()
    try:
        with running_server(engine, allow_runtime_adapters=True) as url:
            for _ in range(2):
                assert complete(url, "poems", n=7).status_code == 200
            r = post(url, "/v1/completions", {"model": "tiny-base", "prompt": "Hi there", "max_tokens": 5,
                                              "n": 3, "stream": True})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            assert complete(url, "nobody").status_code == 404
            assert post(url, "/v1/completions", {"model": "poems", "prompt": "x", "top_p": 7}).status_code == 400
            assert post(url, "/v1/load_lora_adapter", {"lora_name": "plays",
                                                       "lora_path": str(adapters / "plays")}).status_code == 200
            text = httpx.get(url + "/metrics", timeout=10)
    finally:
        engine.stop()
    assert text.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(text.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("lora_gpt2_requests_total", model="poems", status="200") == 2
    assert value("lora_gpt2_requests_total", model="tiny-base", status="200") == 1
    assert value("lora_gpt2_requests_total", model="unknown", status="404") == 1
    assert value("lora_gpt2_requests_total", model="poems", status="400") == 1
    assert value("lora_gpt2_generation_tokens_total", model="poems") == 14
    assert value("lora_gpt2_generation_tokens_total", model="tiny-base") == 15
    assert value("lora_gpt2_prompt_tokens_total", model="poems") == 2 * 3  # "The quick brown"
    assert value("lora_gpt2_prompt_tokens_total", model="tiny-base") == 3 * 2  # "Hi there", n=3
    assert value("lora_gpt2_time_to_first_token_seconds_count", model="poems") == 2
    assert value("lora_gpt2_request_latency_seconds_count", model="tiny-base") == 1
    assert value("lora_gpt2_request_latency_seconds_bucket", model="poems", le="+Inf") == 2
    assert value("lora_gpt2_requests_running") == 0 and value("lora_gpt2_requests_waiting") == 0
    assert value("lora_gpt2_adapters_loaded") == 2
    assert value("lora_gpt2_adapter_loads_total", event="load") == 1
    assert value("lora_gpt2_adapter_bytes") == engine.bank.nbytes > 0
    # the KV pool: empty (and given back) at rest; at most the 3 choices of "Hi there" (2 + 4 cached
    # positions each, one 16-position block each) held blocks at once
    assert value("lora_gpt2_kv_cache_tokens") == value("lora_gpt2_kv_blocks_in_use") == 0
    assert value("lora_gpt2_kv_blocks") == value("lora_gpt2_kv_cache_bytes") == 0
    assert engine.kv.peak_blocks == 3
