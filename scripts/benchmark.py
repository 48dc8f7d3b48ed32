#!/usr/bin/env python3
"""lora-gpt2 vs transformers + PEFT, side by side, in one run on one machine.

    python scripts/benchmark.py --data data/tinyshakespeare            # CPU, GPT-2 small shape
    python scripts/benchmark.py --data data/tinyshakespeare --device cuda --steps 50
    python scripts/benchmark.py --json                                  # machine-readable
    python scripts/benchmark.py --only examples,prepare                 # prompt/completion data only

Figures: LoRA training tokens/s and peak memory (float32; bfloat16 mode vs PEFT under bf16
autocast), batch-1 decoding tokens/s, start-up to first logits, and the machine's own matmul
and memory-bandwidth limits, from which training MFU and the decoding bandwidth bound follow.
On prompt/completion data (Tiny Shakespeare's speeches): counted tokens/s with padded rows and
with packed rows, and preparation tokens/s against tiktoken encoding the whole text on one thread.
Each measurement runs in its own subprocess so memory figures never mix. Weights are random
(GPT-2's real shapes; no hub is needed), tokens are real Tiny Shakespeare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # GPT-2 family shapes (n_layer, n_head, n_embd)
    "tiny": (2, 2, 64),
    "small": (12, 12, 768),
    "medium": (24, 16, 1024),
    "large": (36, 20, 1280),
    "xl": (48, 25, 1600),
}
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- workers (one per subprocess)
def _peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _batches(args):
    import numpy as np

    from lora_gpt2.data import TrainBatches, open_tokens
    from lora_gpt2.data import ensure_prepared

    prepared = ensure_prepared(args.data)
    return TrainBatches(open_tokens(prepared.train), args.batch_size, args.block_size, seed=0), \
        np.asarray(open_tokens(prepared.val)[:16], dtype=np.int64)


def worker_train(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    batches, _ = _batches(args)
    bf16 = args.dtype == "bfloat16"
    if args.system == "lora-gpt2":
        from lora_gpt2 import distributed, train_config as tc
        from lora_gpt2.training import Trainer, factory

        cfg = tc.resolve(tc.flag_values(dict(
            model=args.checkpoint, data=args.data, out=tempfile.mkdtemp(), targets=("qkv_projection",),
            rank=args.rank, alpha=float(args.rank), dropout=0.0, dtype=args.dtype, block_size=args.block_size,
            batch_size=args.batch_size, max_steps=10**6, eval_interval=10**6, device=args.device,
            compile=args.compile, grad_clip=0.0, warmup_steps=0, min_lr_ratio=1.0, lr=1e-4, seed=0,
            layers=args.layers, dora=args.variant == "dora")))
        # the same batches, learning rate and optimiser as the PEFT side below
        trainer = Trainer(factory.build(cfg, distributed.setup(args.device), "no"))

        def step(i: int) -> float:
            trainer.run_.step = i
            return trainer.train_step()[0]
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(args.checkpoint).to(args.device)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0,
                                                 use_dora=args.variant == "dora"))
        model.eval()  # no dropout in either system; gradients flow all the same
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(i: int) -> float:
            batch = batches.get(i).to(args.device)
            x, y = batch.x, batch.y
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    for i in range(args.warmup):
        step(i)
    _sync(args.device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    _sync(args.device)
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.block_size
    return {"tokens_per_s": tokens / seconds, "peak_mb": _peak_memory_mb(args.device), "last_loss": loss}


def _speeches(args) -> Path:
    """Tiny Shakespeare as prompt/completion JSONL (scripts/shakespeare_to_jsonl.py), once."""
    from lora_gpt2.data import resolve

    out = Path(tempfile.gettempdir()) / "lora-gpt2-bench-speeches"
    if not (out / "train.jsonl").is_file():
        sys.path.insert(0, str(ROOT / "scripts"))
        import shakespeare_to_jsonl

        shakespeare_to_jsonl.main([str(resolve(args.data).all_files()[0]), str(out)])
    return out


def worker_examples(args) -> dict:
    """Counted tokens/s of lora-gpt2 on prompt/completion data: padded rows or packed rows."""
    import torch

    from lora_gpt2 import distributed, train_config as tc
    from lora_gpt2.training import Trainer, factory

    torch.manual_seed(0)
    cfg = tc.resolve(tc.flag_values(dict(
        model=args.checkpoint, data=str(_speeches(args)), out=tempfile.mkdtemp(), targets=("qkv_projection",),
        rank=args.rank, alpha=float(args.rank), dropout=0.0, dtype=args.dtype, block_size=args.block_size,
        batch_size=args.batch_size, max_steps=10**6, eval_interval=10**6, device=args.device,
        grad_clip=0.0, warmup_steps=0, min_lr_ratio=1.0, lr=1e-4, seed=0, packing=args.system == "packed")))
    trainer = Trainer(factory.build(cfg, distributed.setup(args.device), "no"))
    counted = processed = 0
    for i in range(args.warmup):
        trainer.run_.step = i
        trainer.train_step()
    _sync(args.device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        trainer.run_.step = i
        processed += trainer.run_.batches.get(i).x.numel()
        counted += trainer.train_step()[1]
    _sync(args.device)
    seconds = time.perf_counter() - start
    return {"counted_tokens_per_s": counted / seconds, "counted_share": counted / processed,
            "peak_mb": _peak_memory_mb(args.device)}


def worker_prepare(args) -> dict:
    """Preparation tokens/s: lora-gpt2's batched, threaded JSONL preparation, and tiktoken encoding
    the same text whole on one thread (what a naive script does)."""
    import shutil

    from lora_gpt2 import tokenizer
    from lora_gpt2.data import ensure_prepared

    source = _speeches(args)
    work = Path(tempfile.mkdtemp())
    shutil.copy(source / "train.jsonl", work / "train.jsonl")
    shutil.copy(source / "valid.jsonl", work / "valid.jsonl")
    text = "".join(json.loads(line)["prompt"] + json.loads(line)["completion"]
                   for line in (work / "train.jsonl").read_text().splitlines())
    tokenizer.get_encoding()  # loading the BPE tables is not encoding
    start = time.perf_counter()
    prepared = ensure_prepared(work)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    whole = len(tokenizer.get_encoding().encode_ordinary(text))
    single = time.perf_counter() - start
    tokens = prepared.info["train_tokens"] + prepared.info["val_tokens"]
    return {"ours_tokens_per_s": tokens / ours, "single_thread_tokens_per_s": whole / single,
            "examples": prepared.examples("train") + prepared.examples("val"), "threads": os.cpu_count()}


def worker_generate(args) -> dict:
    import torch

    _, prompt = _batches(args)
    prompt = prompt.tolist()
    n = args.new_tokens
    if args.system == "lora-gpt2":
        from lora_gpt2 import load_pretrained
        from lora_gpt2.generate import SamplingConfig, generate

        model = load_pretrained(args.checkpoint, targets=("qkv_projection",), r=args.rank,
                                device=args.device, dtype=_dtype(args.dtype)).eval()

        def run(k: int) -> int:
            return sum(1 for _ in generate(model, prompt, SamplingConfig(max_new_tokens=k, temperature=0)))
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(args.checkpoint, dtype=_dtype(args.dtype)).to(args.device)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["c_attn"],
                                                 fan_in_fan_out=True)).eval()
        ids = torch.tensor([prompt], device=args.device)

        def run(k: int) -> int:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                     min_new_tokens=k, do_sample=False, pad_token_id=0)
            return out.size(1) - ids.size(1)

    run(8)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    made = run(n)
    _sync(args.device)
    return {"tokens_per_s": made / (time.perf_counter() - start), "tokens": made}


def worker_startup(args) -> dict:
    """Imports + load + one forward; `spawned_at` is the parent's clock when it started us."""
    import torch  # noqa: F401  (counted: both systems need it)

    if args.system == "lora-gpt2":
        from lora_gpt2 import load_pretrained

        model = load_pretrained(args.checkpoint, targets=())
        ids = torch.tensor([[464, 3290, 373]])
        with torch.inference_mode():
            model(ids)
    else:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(args.checkpoint)
        ids = torch.tensor([[464, 3290, 373]])
        with torch.inference_mode():
            model(ids).logits
    ready = time.time()
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
    return {"seconds": ready - args.spawned_at, "rss_mb": rss}


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def worker_machine(args) -> dict:
    """Dense matmul FLOP/s (fp32, bf16) and memory bandwidth (a large copy)."""
    import torch

    from lora_gpt2.flops import measure_matmul_flops

    device = torch.device(args.device)
    out = {f"matmul_{dt}_tflops": measure_matmul_flops(device, _dtype(dt), repeats=5) / 1e12
           for dt in ("float32", "bfloat16")}
    x = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=args.device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        _sync(args.device)
        start = time.perf_counter()
        y.copy_(x)
        _sync(args.device)
        best = min(best, time.perf_counter() - start)
    out["bandwidth_gbs"] = 2 * x.numel() * 4 / best / 1e9  # read + write
    return out


WORKERS = {"train": worker_train, "generate": worker_generate, "startup": worker_startup,
           "machine": worker_machine, "examples": worker_examples, "prepare": worker_prepare}


# ---------------------------------------------------------------- the parent: plan, run, report
def spawn(args, task: str, system: str = "", dtype: str = "float32", layers: str | None = None,
          variant: str = "lora") -> dict:
    cmd = [sys.executable, __file__, "--worker", task, "--system", system, "--dtype", dtype,
           "--checkpoint", str(args.checkpoint), "--data", args.data, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--block-size", str(args.block_size), "--rank", str(args.rank), "--new-tokens", str(args.new_tokens),
           "--spawned-at", repr(time.time())] + (["--compile"] if args.compile else []) + \
        (["--layers", layers] if layers else []) + ["--variant", variant]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {task}/{system}/{dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_checkpoint(size: str, directory: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd = SIZES[size]
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).save_pretrained(directory)


def flops_per_token(size: str, block: int) -> float:
    from lora_gpt2.config import ModelConfig
    from lora_gpt2.flops import lora_training_flops_per_token

    n_layer, n_head, n_embd = SIZES[size]
    return lora_training_flops_per_token(ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd), block)


def model_bytes(size: str, dtype: str) -> float:
    n_layer, _, d = SIZES[size]
    params = n_layer * 12 * d * d + 50257 * d + 1024 * d
    return params * (2 if dtype == "bfloat16" else 4)


SECTIONS = ("train", "generate", "examples", "prepare", "layers", "dora")


def run(args) -> dict:
    results: dict = {"config": {k: getattr(args, k) for k in
                                ("size", "device", "batch_size", "block_size", "rank", "steps", "warmup",
                                 "new_tokens", "repeats", "compile", "only")}}
    only = set(args.only.split(","))
    results["machine"] = spawn(args, "machine")
    if "train" in only:
        for dtype in ("float32", "bfloat16"):
            # alternate the systems and keep each one's best round: a shared machine's noise
            # then penalises neither side more than the other
            for _ in range(args.repeats):
                for system in ("lora-gpt2", "peft"):
                    got = spawn(args, "train", system, dtype)
                    print(f"  train {dtype:8} {system:9} {got}", file=sys.stderr)
                    best = results.get(f"train_{dtype}_{system}")
                    if best is None or got["tokens_per_s"] > best["tokens_per_s"]:
                        results[f"train_{dtype}_{system}"] = got
    if "generate" in only:
        for system in ("lora-gpt2", "peft"):
            results[f"generate_{system}"] = spawn(args, "generate", system)
            results[f"startup_{system}"] = spawn(args, "startup", system)
            print(f"  generate/startup {system}: {results[f'generate_{system}']} {results[f'startup_{system}']}",
                  file=sys.stderr)
    if "examples" in only:
        for layout in ("padded", "packed"):
            results[f"examples_{layout}"] = spawn(args, "examples", layout)
            print(f"  examples {layout}: {results[f'examples_{layout}']}", file=sys.stderr)
    if "prepare" in only:
        results["prepare"] = spawn(args, "prepare")
    if "dora" in only:  # DoRA against PEFT's DoRA, and each against its own plain LoRA, in one run
        for variant in ("lora", "dora"):
            for system in ("lora-gpt2", "peft"):
                results[f"variant_{variant}_{system}"] = got = spawn(args, "train", system, variant=variant)
                print(f"  {variant} {system}: {got}", file=sys.stderr)
    if "layers" in only:  # backward stops at the lowest adapted block
        results["layers_all"] = spawn(args, "train", "lora-gpt2")
        results["layers_last4"] = spawn(args, "train", "lora-gpt2", layers="4")
        print(f"  layers: all {results['layers_all']} last 4 {results['layers_last4']}", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    flops = flops_per_token(args.size, args.block_size)
    m = results["machine"]
    derived = results["derived"] = {"flops_per_token": flops}
    if "train" in only:
        derived["mfu_bfloat16"] = (results["train_bfloat16_lora-gpt2"]["tokens_per_s"] * flops
                                   / (m["matmul_bfloat16_tflops"] * 1e12))
        derived["mfu_float32"] = (results["train_float32_lora-gpt2"]["tokens_per_s"] * flops
                                  / (m["matmul_float32_tflops"] * 1e12))
    if "generate" in only:
        derived["decode_bandwidth_fraction"] = (results["generate_lora-gpt2"]["tokens_per_s"]
                                                * model_bytes(args.size, "float32") / (m["bandwidth_gbs"] * 1e9))
    return results


ROWS = [  # (label, key, field, higher is better, target ratio)
    ("training tokens/s, float32", "train_float32", "tokens_per_s", True, 1.25),
    ("training tokens/s, bf16 mode vs PEFT + autocast", "train_bfloat16", "tokens_per_s", True, 2.0),
    ("training peak memory MB, float32", "train_float32", "peak_mb", False, 0.45),
    ("training peak memory MB, bf16", "train_bfloat16", "peak_mb", False, 0.45),
    ("batch-1 generation tokens/s", "generate", "tokens_per_s", True, 3.0),
    ("start-up to first logits, s", "startup", "seconds", False, 0.6),
    ("memory after first logits MB", "startup", "rss_mb", False, None),
]


def table(results: dict) -> str:
    lines = ["| figure | lora-gpt2 | transformers + PEFT | ratio | target |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, key, field, higher, target in ROWS:
        if f"{key}_lora-gpt2" not in results:
            continue
        ours, theirs = results[f"{key}_lora-gpt2"][field], results[f"{key}_peft"][field]
        ratio = ours / theirs
        goal = "" if target is None else (f"≥ {target}×" if higher else f"≤ {target}×")
        lines.append(f"| {label} | {ours:,.1f} | {theirs:,.1f} | {ratio:.2f}× | {goal} |")
    m, d = results["machine"], results["derived"]
    lines += [
        "",
        f"machine: matmul {m['matmul_float32_tflops'] * 1000:,.0f} GFLOP/s fp32, "
        f"{m['matmul_bfloat16_tflops'] * 1000:,.0f} GFLOP/s bf16; copy bandwidth {m['bandwidth_gbs']:.1f} GB/s",
    ]
    if "mfu_float32" in d:
        lines.append(f"training MFU (FLOPs/token = 4·N_matmul + 8·L·T·d = {d['flops_per_token'] / 1e6:,.0f} M): "
                     f"bf16 mode {100 * d['mfu_bfloat16']:.0f}% of measured bf16 matmul, "
                     f"float32 {100 * d['mfu_float32']:.0f}% of measured fp32 matmul (target ≥ 60% in bf16)")
    if "decode_bandwidth_fraction" in d:
        lines.append(f"decoding: {100 * d['decode_bandwidth_fraction']:.0f}% of the bandwidth bound "
                     "(fp32 weights read once per token)")
    if "examples_padded" in results:
        pad, pack = results["examples_padded"], results["examples_packed"]
        lines += [
            "",
            "prompt/completion data (Tiny Shakespeare speeches, scripts/shakespeare_to_jsonl.py), lora-gpt2 only:",
            f"counted tokens/s: padded rows {pad['counted_tokens_per_s']:,.0f} ({100 * pad['counted_share']:.0f}% "
            f"of positions counted), packed rows {pack['counted_tokens_per_s']:,.0f} "
            f"({100 * pack['counted_share']:.0f}%): packing "
            f"{pack['counted_tokens_per_s'] / pad['counted_tokens_per_s']:.2f}×; peak memory "
            f"{pad['peak_mb']:,.0f} vs {pack['peak_mb']:,.0f} MB",
        ]
    if "prepare" in results:
        prep = results["prepare"]
        lines.append(f"preparation: {prep['ours_tokens_per_s']:,.0f} tokens/s ({prep['examples']:,} examples, "
                     f"{prep['threads']} threads) vs {prep['single_thread_tokens_per_s']:,.0f} tokens/s encoding "
                     "the text whole on one thread")
    if "variant_dora_lora-gpt2" in results:
        v = {k: results[f"variant_{k}"] for k in ("lora_lora-gpt2", "lora_peft", "dora_lora-gpt2", "dora_peft")}
        lines.append(
            f"DoRA (float32): lora-gpt2 {v['dora_lora-gpt2']['tokens_per_s']:,.0f} tokens/s, "
            f"{v['dora_lora-gpt2']['peak_mb']:,.0f} MB; PEFT {v['dora_peft']['tokens_per_s']:,.0f} tokens/s, "
            f"{v['dora_peft']['peak_mb']:,.0f} MB ({v['dora_lora-gpt2']['tokens_per_s'] / v['dora_peft']['tokens_per_s']:.2f}× "
            f"the speed); DoRA's cost over plain LoRA: lora-gpt2 "
            f"{v['dora_lora-gpt2']['tokens_per_s'] / v['lora_lora-gpt2']['tokens_per_s']:.2f}×, PEFT "
            f"{v['dora_peft']['tokens_per_s'] / v['lora_peft']['tokens_per_s']:.2f}× the tokens/s")
    if "layers_all" in results:
        every, last = results["layers_all"], results["layers_last4"]
        lines.append(f"adapters on the last 4 of the blocks (--layers 4) vs all: {last['tokens_per_s']:,.0f} vs "
                     f"{every['tokens_per_s']:,.0f} tokens/s ({last['tokens_per_s'] / every['tokens_per_s']:.2f}×), "
                     f"peak memory {last['peak_mb']:,.0f} vs {every['peak_mb']:,.0f} MB")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--data", default="data/tinyshakespeare", help="Tiny Shakespeare (lora-gpt2 download-data)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="rounds of each training measurement (best kept)")
    p.add_argument("--compile", action="store_true", help="torch.compile lora-gpt2's model")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--layers", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--system", default="", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--spawned-at", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint = Path(tmp) / f"gpt2-{args.size}"
        print(f"writing a random GPT-2 {args.size} checkpoint to {args.checkpoint}", file=sys.stderr)
        make_checkpoint(args.size, args.checkpoint)
        results = run(args)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
