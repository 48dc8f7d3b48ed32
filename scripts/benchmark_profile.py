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

    from lora_gpt2 import distributed, train_config as tc
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
