"""`/metrics` in Prometheus' text format (prometheus_client, in the serve extra).

Each app has a registry of its own, so two servers in one process (the tests) never share
counts. Gauges read the engine when scraped; counters and histograms are fed by the requests.
Model labels are only the names the server answers for ("unknown" otherwise), so a client cannot
grow the label set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .engine import Engine

# seconds: first tokens arrive in tens of milliseconds on a GPU, in seconds on a busy 2-core CPU
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


CONTENT_TYPE = CONTENT_TYPE_LATEST  # Prometheus' text format


class Metrics:
    def __init__(self, engine: "Engine") -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lora_gpt2_requests", "Completion requests answered, by model and HTTP status",
                                ["model", "status"], registry=r)
        self.prompt_tokens = Counter("lora_gpt2_prompt_tokens", "Prompt tokens of the requests decoded, "
                                     "counted once per choice", ["model"], registry=r)
        self.generation_tokens = Counter("lora_gpt2_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("lora_gpt2_time_to_first_token_seconds", "From a request's arrival to its first "
                              "token", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("lora_gpt2_request_latency_seconds", "From a request's arrival to its last token",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_changes = Counter("lora_gpt2_adapter_loads", "Adapters loaded, replaced by a newer "
                                       "checkpoint (--watch) or unloaded at run time", ["event"], registry=r)
        Gauge("lora_gpt2_requests_running", "Sequences in the decoding batch", registry=r).set_function(
            lambda: engine.running)
        Gauge("lora_gpt2_requests_waiting", "Sequences waiting for a batch slot", registry=r).set_function(
            lambda: engine.waiting)
        kv = engine.kv
        Gauge("lora_gpt2_kv_cache_tokens", "Positions the decoding sequences hold in the KV cache",
              registry=r).set_function(lambda: kv.tokens)
        Gauge("lora_gpt2_kv_blocks_in_use", f"KV cache blocks ({getattr(kv, 'block_size', 0)} positions each) "
              "held by sequences; 0 with --kv-cache rows", registry=r).set_function(lambda: kv.blocks_in_use)
        Gauge("lora_gpt2_kv_blocks", "KV cache blocks in the pool, in use or free", registry=r).set_function(
            lambda: kv.blocks)
        Gauge("lora_gpt2_kv_cache_bytes", "Memory the KV cache takes", registry=r).set_function(lambda: kv.nbytes)
        Gauge("lora_gpt2_adapters_loaded", "Adapters served", registry=r).set_function(
            lambda: len(engine.adapters.current))
        Gauge("lora_gpt2_adapter_bytes", "Memory the adapters' tensors take", registry=r).set_function(
            lambda: engine.bank.nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
