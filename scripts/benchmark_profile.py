"""Where lora-gpt2's training step spends its time: the PyTorch profiler over a few steps,
its ops' own time grouped by kind of work (`benchmark.py --only profile`)."""

from __future__ import annotations

import tempfile
import time

# (kind, substrings of profiler op names), first match wins; anything else is "other"
KINDS = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("layer norms", ("layer_norm",)),
    ("loss: softmax, exp, pick", ("softmax", "aten::exp", "aten::index", "aten::gather", "aten::sub_")),
    ("GELU", ("gelu",)),
    ("optimiser", ("_foreach", "adam", "aten::lerp", "aten::addcdiv", "aten::sqrt")),
    ("casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
)


def kind_of(name: str) -> str:
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), "other ops")


def worker_profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lora_gpt2.training import distributed, config as tc
    from lora_gpt2.training import Trainer, factory

    torch.manual_seed(0)
    cfg = tc.resolve(tc.flag_values(dict(
        model=args.checkpoint, data=args.data, out=tempfile.mkdtemp(), targets=("qkv_projection",),
        rank=args.rank, alpha=float(args.rank), dropout=0.0, dtype=args.dtype, block_size=args.block_size,
        batch_size=args.batch_size, max_steps=10**6, eval_interval=10**6, device=args.device,
        grad_clip=0.0, warmup_steps=0, min_lr_ratio=1.0, lr=1e-4, seed=0)))
    trainer = Trainer(factory.build(cfg, distributed.setup(args.device), "no"))
    steps = max(1, min(args.steps, 3))
    for i in range(args.warmup):
        trainer.run_.step = i
        trainer.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(args.warmup, args.warmup + steps):
            trainer.run_.step = i
            trainer.train_step()
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    by_kind: dict[str, float] = {}
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + event.self_cpu_time_total / 1000
    by_kind = {k: v / steps for k, v in by_kind.items()}
    by_kind["Python and waiting (wall time no op accounts for)"] = max(0.0, wall_ms - sum(by_kind.values()))
    return {"wall_ms_per_step": wall_ms, "ms_per_step": by_kind, "dtype": args.dtype}


DECODE_KINDS = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("layer norms", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("sampling", ("argmax", "topk", "softmax", "multinomial", "isfinite", "aten::all")),
    ("KV cache writes, views, copies", ("copy_", "slice", "select", "view", "transpose", "as_strided", "split",
                                        "reshape", "aten::cat", "aten::empty", "aten::to")),
)


def worker_decode_profile(args) -> dict:
    """Batch-1 greedy decoding through a generation session (as `generate` runs), unprofiled for
    its speed, then under the profiler for where a token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from benchmark_common import session as make_session
    from lora_gpt2.inference.sampling import SamplingConfig

    session = make_session(args)
    prompt, n = list(range(100, 116)), 64
    cfg = SamplingConfig(max_new_tokens=n, temperature=0)

    def run() -> None:
        "".join(session.stream(prompt, cfg))

    run()  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) * 1000 / n)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        profiled_ms = (time.perf_counter() - start) * 1000 / n
    by_kind: dict[str, float] = {}
    for event in prof.key_averages():
        kind = next((k for k, parts in DECODE_KINDS if any(p in event.key for p in parts)), "other ops")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_cpu_time_total / 1000 / n
    by_kind["Python and waiting"] = max(0.0, profiled_ms - sum(by_kind.values()))
    return {"ms_per_token": best, "profiled_ms_per_token": profiled_ms, "ms_per_token_by_kind": by_kind,
            **_decode_parts(session)}


def _decode_parts(session, rounds: int = 5, reps: int = 10) -> dict:
    """One decoding step (forward of one token at a 32-token cache, and its argmax) against its
    products alone (the session's decode-time copies, in their format), run back to back with the
    same shapes: the products are the step's floor, the rest is the ops between them and Python.
    The copy bandwidth is measured in the same rounds; each figure is the median round's. Empty
    where no weight has a copy (not a CPU)."""
    import torch

    from benchmark_machine import copy_bandwidth_gbs
    from lora_gpt2.model.gpt2 import KVCache

    model, copies = session.model, list(session.layout.copies.values())
    layers = [c.module for c in copies]
    if not layers:
        return {}
    inputs = [torch.randn(1, 1, m.in_features) for m in layers]
    cache = KVCache.empty(model.config, 1, model.frozen_dtype(), "cpu", 64)
    token = torch.tensor([[100]])

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1000 / reps

    def step() -> None:
        cache.length = 32
        model(token, cache, at=-1).argmax(dim=-1).tolist()

    def products() -> None:  # through the copies' own format: blocked float, or int8 (--quantize)
        for c, x in zip(copies, inputs):
            c.format.linear(x, c.packed, c.module.bias)

    got: dict[str, list[float]] = {"step_ms": [], "products_ms": [], "bandwidth_gbs": []}
    with torch.inference_mode():
        model(torch.arange(100, 132)[None], cache, at=-1)
        for _ in range(rounds):
            got["step_ms"].append(timed(step))
            got["products_ms"].append(timed(products))
            got["bandwidth_gbs"].append(copy_bandwidth_gbs("cpu", repeats=3))
    median = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
    return {**{f"parts_{k}": v for k, v in median.items()}, "parts_products": len(layers),
            "parts_weight_bytes": session.layout.describe()["bytes"]}
