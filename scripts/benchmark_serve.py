"""The serving figures of scripts/benchmark.py (`--only serve`).

`lora-gpt2 serve` runs as users run it (its own process, HTTP on 127.0.0.1) over 4 adapters; 16
streamed greedy requests, spread over the adapters, are sent by 1, 4 and 16 concurrent clients.
1 client is the same requests served one at a time. Reported: total generated tokens/s, latency
p50 / p99, time to first token, and the server's memory with 0 and with 4 adapters. Each KV
cache layout (`--kv-cache paged`, the default, and `rows`) serves the same rounds, and 16 clients
with 400-token prompts; its KV memory per request is read from /health while 16 requests that
may reach 900 tokens hold their first 8. Beside it, transformers + PEFT decode the same 16
requests with the same adapters (no server): one at a time with `set_adapter`, and as one
mixed-adapter batch (`generate(adapter_names=...)`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmark_common import resident_mb  # the scripts folder is on sys.path

ADAPTERS = 4
MANY = 32  # adapters in the memory measurement: their cost must stand out of RSS noise
REQUESTS = 16
CLIENTS = (1, 4, 16)
PROMPT_TOKENS = 16
NEW_TOKENS = 64
LONG_PROMPT, LONG_NEW = 400, 32  # the long-prompt round: where the layouts part
LAYOUTS = ("paged", "rows")
RESERVE_MAX, RESERVE_HELD = 900, 8  # the KV memory probe: requests that may reach 916 positions hold 24


def prompts(args, tokens: int = PROMPT_TOKENS) -> list[list[int]]:
    """16 windows of Tiny Shakespeare's validation text, one per request."""
    from lora_gpt2.data import ensure_prepared, open_tokens

    val = open_tokens(ensure_prepared(args.data).val)
    return [[int(t) for t in val[i * 97: i * 97 + tokens]] for i in range(REQUESTS)]


def make_adapters(args, folder: Path) -> list[str]:
    """4 PEFT LoRA adapters on c_attn with random B (a fresh B is zero: every adapter would equal
    the base), saved as PEFT saves them: both systems read the same files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    names = [f"adapter{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(args.checkpoint),
                               LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["c_attn"],
                                          fan_in_fan_out=True))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.save_pretrained(folder / name)
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lora-gpt2 serve` in its own process."""

    def __init__(self, args, adapters: Path | None, layout: str = "paged") -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lora_gpt2", "serve", "--model", str(args.checkpoint), "--port", str(self.port),
               "--device", args.device, "--dtype", "float32", "--max-batch", str(REQUESTS), "--kv-cache", layout]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd + (["--adapters", str(adapters)] if adapters else []),
                                     stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"lora-gpt2 serve failed to start:\n{self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("lora-gpt2 serve did not answer within 300 s")

    def rss_mb(self) -> float:
        return resident_mb(self.proc.pid)["rss"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=60)


def ask(url: str, model: str, prompt: list[int], max_tokens: int, held=None) -> dict:
    """One streamed greedy request: its latency, time to first token and generated tokens.
    `held` (a Barrier): after RESERVE_HELD tokens, wait on it, then hang up."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            tokens += bool(chunk["choices"])
            if held is not None and tokens == RESERVE_HELD:
                held.wait()  # the KV memory is read now
                held.wait()  # and read: hang up
                return {}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency_s": time.perf_counter() - start, "first_token_s": first, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]  # nearest rank


def load(url: str, names: list[str], prompt_list: list[list[int]], clients: int, new: int = NEW_TOKENS) -> dict:
    jobs = [(names[i % len(names)], p) for i, p in enumerate(prompt_list)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda job: ask(url, job[0], job[1], new), jobs))
    wall = time.perf_counter() - start
    latencies = [d["latency_s"] for d in done]
    return {"clients": clients, "tokens": sum(d["tokens"] for d in done), "wall_s": wall,
            "tokens_per_s": sum(d["tokens"] for d in done) / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "first_token_p50_s": percentile([d["first_token_s"] for d in done], 50)}


def kv_reserved(url: str, names: list[str], prompt_list: list[list[int]]) -> dict:
    """/health's KV cache while 16 requests with max_tokens RESERVE_MAX hold their first tokens."""
    import threading

    import httpx

    held = threading.Barrier(len(prompt_list) + 1)
    with ThreadPoolExecutor(len(prompt_list)) as pool:
        futures = [pool.submit(ask, url, names[i % len(names)], p, RESERVE_MAX, held) for i, p in enumerate(prompt_list)]
        held.wait(timeout=600)
        kv = httpx.get(url + "/health", timeout=10).json()["kv_cache"]
        held.wait(timeout=60)
        for f in futures:
            f.result()
    return kv


def run(args, spawn) -> dict:
    """Everything for `--only serve`; `spawn` runs the PEFT worker in its own process."""
    import tempfile

    import httpx

    results: dict = {}
    prompt_list = prompts(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        names = make_adapters(args, folder)
        bare = Server(args, None)  # the base model alone: what each adapter adds is measured against it
        try:
            ask(bare.url, Path(args.checkpoint).name, prompt_list[0], 8)
            results["serve_rss_0_mb"] = bare.rss_mb()
        finally:
            bare.stop()
        for layout in LAYOUTS:  # the paged layout's figures keep their names; the other's are prefixed
            tag = "serve" if layout == "paged" else f"serve_{layout}"
            server = Server(args, folder, layout)
            try:
                for name in names:  # warm-up: one short request per adapter
                    ask(server.url, name, prompt_list[0], 8)
                if layout == "paged":
                    results["serve_rss_4_mb"] = server.rss_mb()
                for clients in CLIENTS:
                    for _ in range(args.repeats):  # best round of each
                        got = load(server.url, names, prompt_list, clients)
                        print(f"  serve {layout} {clients} clients: {got}", file=sys.stderr)
                        best = results.get(f"{tag}_{clients}")
                        if best is None or got["tokens_per_s"] > best["tokens_per_s"]:
                            results[f"{tag}_{clients}"] = got
                results[f"{tag}_long"] = got = load(server.url, names, prompts(args, LONG_PROMPT), REQUESTS, LONG_NEW)
                print(f"  serve {layout} long prompts: {got}", file=sys.stderr)
                results[f"{tag}_kv"] = got = kv_reserved(server.url, names, prompt_list)
                print(f"  serve {layout} KV while held: {got}", file=sys.stderr)
            finally:
                server.stop()
        results["serve_adapter_mb"] = sum(f.stat().st_size for f in (folder / names[0]).glob("*.safetensors")) / 2**20
        many = Path(tmp) / "many"  # copies of the 4: each is its own tensors in the server
        for i in range(MANY):
            shutil.copytree(folder / names[i % ADAPTERS], many / f"copy{i}")
        server = Server(args, many)
        try:
            ask(server.url, "copy0", prompt_list[0], 8)
            results["serve_rss_many_mb"] = server.rss_mb()
            results["serve_bank_many_mb"] = httpx.get(server.url + "/health", timeout=10).json()["adapter_bytes"] / 2**20
        finally:
            server.stop()
        results["serve_peft"] = got = spawn(args, "serve_peft", "peft", adapters=str(folder))
        print(f"  serve peft: {got}", file=sys.stderr)
    return results


def worker_serve_peft(args) -> dict:
    """transformers + PEFT, the same 16 requests and adapters: one at a time, then one mixed batch."""
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    folder = Path(args.adapters)
    names = sorted(p.name for p in folder.iterdir())
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(args.checkpoint), folder / names[0],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    model.eval()
    prompt_list = prompts(args)
    rows = [names[i % len(names)] for i in range(len(prompt_list))]

    def generate(ids, **kw) -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kw)
        return (out.size(1) - ids.size(1)) * out.size(0)

    model.set_adapter(names[0])
    generate(torch.tensor([prompt_list[0]]))  # warm-up
    start, made = time.perf_counter(), 0
    for name, prompt in zip(rows, prompt_list):
        model.set_adapter(name)
        made += generate(torch.tensor([prompt]))
    one = made / (time.perf_counter() - start)
    start = time.perf_counter()  # every prompt has PROMPT_TOKENS tokens: no padding needed
    made = generate(torch.tensor(prompt_list), adapter_names=rows)
    batch = made / (time.perf_counter() - start)
    return {"one_at_a_time_tokens_per_s": one, "mixed_batch_tokens_per_s": batch}


def lines(results: dict) -> list[str]:
    if "serve_1" not in results:
        return []
    one = results["serve_1"]["tokens_per_s"]
    out = ["", f"serving: `lora-gpt2 serve` over HTTP, {REQUESTS} streamed greedy requests ({PROMPT_TOKENS} prompt + "
               f"{NEW_TOKENS} new tokens) spread over {ADAPTERS} adapters, 1 client = one at a time:", "",
           "| clients | tokens/s | vs one at a time | latency p50 s | latency p99 s | first token p50 s |",
           "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for clients in CLIENTS:
        r = results[f"serve_{clients}"]
        out.append(f"| {clients} | {r['tokens_per_s']:,.1f} | {r['tokens_per_s'] / one:.2f}× | {r['p50_s']:.2f} | "
                   f"{r['p99_s']:.2f} | {r['first_token_p50_s']:.3f} |")
    out += ["", "KV cache layouts, the same server and rounds (`--kv-cache`; paged is the default):", "",
            "| figure | paged | rows | paged / rows |", "| --- | ---: | ---: | ---: |"]
    for clients in CLIENTS:
        a, b = results[f"serve_{clients}"]["tokens_per_s"], results[f"serve_rows_{clients}"]["tokens_per_s"]
        out.append(f"| tokens/s, {clients} client{'s' * (clients > 1)} | {a:,.1f} | {b:,.1f} | {a / b:.2f}× |")
    a, b = results["serve_16"]["first_token_p50_s"], results["serve_rows_16"]["first_token_p50_s"]
    out.append(f"| first token p50 s, 16 clients | {a:.3f} | {b:.3f} | {a / b:.2f}× |")
    a, b = results["serve_long"]["tokens_per_s"], results["serve_rows_long"]["tokens_per_s"]
    out.append(f"| tokens/s, 16 clients, {LONG_PROMPT}-token prompts + {LONG_NEW} new | {a:,.1f} | {b:,.1f} | "
               f"{a / b:.2f}× |")
    a, b = results["serve_long"]["first_token_p50_s"], results["serve_rows_long"]["first_token_p50_s"]
    out.append(f"| first token p50 s, 16 clients, {LONG_PROMPT}-token prompts | {a:.2f} | {b:.2f} | {a / b:.2f}× |")
    paged, rows = results["serve_kv"], results["serve_rows_kv"]
    in_use = paged["blocks_in_use"] * paged["bytes"] / max(paged["blocks"], 1)  # the pool's blocks in use
    a, b = in_use / REQUESTS / 2**20, rows["bytes"] / REQUESTS / 2**20
    out.append(f"| KV MB per request holding its first {PROMPT_TOKENS + RESERVE_HELD} positions, `max_tokens` "
               f"{RESERVE_MAX} | {a:,.2f} | {b:,.2f} | {a / b:.3f}× |")
    out.append(f"| KV MB for 16 such requests (paged: blocks in use; the pool holds {paged['bytes'] / 2**20:,.1f}) | "
               f"{in_use / 2**20:,.1f} | {rows['bytes'] / 2**20:,.1f} | {in_use / max(rows['bytes'], 1):.3f}× |")
    peft = results["serve_peft"]
    per_adapter = results["serve_bank_many_mb"] / MANY
    out += ["", f"transformers + PEFT, the same requests and adapters, no server: one at a time "
                f"{peft['one_at_a_time_tokens_per_s']:,.1f} tokens/s; as one mixed-adapter batch (adapter_names) "
                f"{peft['mixed_batch_tokens_per_s']:,.1f} tokens/s",
            f"memory per adapter: {per_adapter:,.2f} MB in the server's bank with {MANY} adapters (/health's "
            f"adapter_bytes; each adapter's own tensors: {results['serve_adapter_mb']:,.2f} MB); server RSS after one "
            f"request {results['serve_rss_0_mb']:,.0f} MB with no adapter, {results['serve_rss_4_mb']:,.0f} MB with "
            f"{ADAPTERS}, {results['serve_rss_many_mb']:,.0f} MB with {MANY}"]
    return out
