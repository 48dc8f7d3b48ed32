"""The measurements of scripts/benchmark.py, one per subprocess (`benchmark.py --worker NAME`).

Each worker builds what it measures, times it and returns a dict of figures; benchmark.py
plans the runs, compares the systems and prints the table.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

# the scripts folder is on sys.path
from benchmark_common import dtype, measure, peak_memory_mb, resident_mb, session as make_session, sync, timed
from benchmark_machine import copy_bandwidth_gbs

ROOT = Path(__file__).resolve().parents[1]


def _batches(args):
    import numpy as np

    from lora_gpt2.data import TrainBatches, open_tokens
    from lora_gpt2.data import ensure_prepared

    prepared = ensure_prepared(args.data)
    return TrainBatches(open_tokens(prepared.train), args.batch_size, args.block_size, seed=0), \
        np.asarray(open_tokens(prepared.val)[:16], dtype=np.int64)


def _cap_memory(args) -> None:
    """--memory-cap-mb: the process's data segment (heap, anonymous mappings) may not grow past it,
    as under a container's or `ulimit -d` limit; an allocation beyond it fails."""
    import resource

    if args.memory_cap_mb:
        cap = args.memory_cap_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def worker_train(args) -> dict:
    """Training tokens/s and peak memory; under --memory-cap-mb, whether a step fits at all."""
    _cap_memory(args)
    try:
        return _train(args)
    except (RuntimeError, MemoryError) as exc:  # out of memory under the cap
        if not args.memory_cap_mb:
            raise
        return {"completed": False, "error": " ".join(str(exc).split())[:160],
                "peak_mb": peak_memory_mb(args.device)}


def _train(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    batches, _ = _batches(args)
    bf16 = args.dtype == "bfloat16"
    if args.system == "lora-gpt2":
        from lora_gpt2.training import distributed, config as tc
        from lora_gpt2.training import Trainer, factory

        cfg = tc.resolve(tc.flag_values(dict(
            model=args.checkpoint, data=args.data, out=tempfile.mkdtemp(), targets=("qkv_projection",),
            rank=args.rank, alpha=float(args.rank), dropout=0.0, dtype=args.dtype, block_size=args.block_size,
            batch_size=args.batch_size, max_steps=10**6, eval_interval=10**6, device=args.device,
            compile=args.compile, grad_clip=0.0, warmup_steps=0, min_lr_ratio=1.0, lr=1e-4, seed=0,
            layers=args.layers, variant=args.variant, grad_checkpoint=args.grad_ckpt)))
        # the same batches, learning rate and optimiser as the PEFT side below
        trainer = Trainer(factory.build(cfg, distributed.setup(args.device), "no"))

        def step(i: int) -> float:
            trainer.run_.step = i
            return trainer.train_step()[0]
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        # no dropout in either system (GPT-2's own dropouts off: gradient checkpointing needs train mode)
        model = GPT2LMHeadModel.from_pretrained(args.checkpoint, resid_pdrop=0.0, embd_pdrop=0.0,
                                                attn_pdrop=0.0).to(args.device)
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0,
                                                 use_dora=args.variant == "dora"))
        model.train(args.grad_ckpt)  # transformers recomputes only in train mode; else as before, eval
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
    sync(args.device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.block_size
    return {"tokens_per_s": tokens / seconds, "peak_mb": peak_memory_mb(args.device), "last_loss": loss,
            "completed": True}


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

    from lora_gpt2.training import distributed, config as tc
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
    sync(args.device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        trainer.run_.step = i
        processed += trainer.run_.batches.get(i).x.numel()
        counted += trainer.train_step()[1]
    sync(args.device)
    seconds = time.perf_counter() - start
    return {"counted_tokens_per_s": counted / seconds, "counted_share": counted / processed,
            "peak_mb": peak_memory_mb(args.device)}


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
        from lora_gpt2.inference.sampling import SamplingConfig

        session = make_session(args)

        def run(k: int) -> int:
            stream = session.stream(prompt, SamplingConfig(max_new_tokens=k, temperature=0))
            "".join(stream)
            return len(stream.tokens)
    else:
        model = _peft_for_decoding(args)
        ids = torch.tensor([prompt], device=args.device)

        def run(k: int) -> int:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                     min_new_tokens=k, do_sample=False, pad_token_id=0)
            return out.size(1) - ids.size(1)

    return _rounds_with_bandwidth(run, n, args.device)


def _rounds_with_bandwidth(run, tokens: int, device: str, rounds: int = 3) -> dict:
    """Tokens/s of run(tokens) over a few rounds, each between two measurements of the copy
    bandwidth: on a shared machine the bound moves as neighbours come and go, so a decode's share
    of it is taken against the bandwidth of its own minutes (the median round's)."""
    run(8)
    speeds, shares_of = [], []
    for _ in range(rounds):
        before = copy_bandwidth_gbs(device)
        speed = measure(run, tokens, device)[1]
        speeds.append(speed)
        shares_of.append((speed, (before + copy_bandwidth_gbs(device)) / 2))
    middle = sorted(shares_of, key=lambda pair: pair[0] / pair[1])[len(shares_of) // 2]
    return {"tokens_per_s": sorted(speeds)[len(speeds) // 2], "tokens": tokens, "rounds": speeds,
            "bandwidth_gbs": middle[1], "tokens_per_s_at_that_bandwidth": middle[0]}


def _peft_for_decoding(args):
    """transformers' GPT-2 with a PEFT LoRA on c_attn, as the lora-gpt2 side adapts qkv_projection."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(args.checkpoint, dtype=dtype(args.dtype)).to(args.device)
    return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["c_attn"],
                                            fan_in_fan_out=True)).eval()


def worker_samples(args) -> dict:
    """Total tokens/s of N sampled completions of one prompt (temperature 1, top-k 200, as
    `generate` samples): lora-gpt2 decodes them as one batch, transformers with
    num_return_sequences; N = 1 is the baseline."""
    import torch

    _, prompt = _batches(args)
    prompt, n, k = prompt.tolist(), args.samples, args.new_tokens
    if args.system == "lora-gpt2":
        from lora_gpt2.inference.sampling import SamplingConfig

        session = make_session(args)

        def run(tokens: int) -> int:
            cfg = SamplingConfig(max_new_tokens=tokens, temperature=1.0, top_k=200)
            streams = session.stream_samples(prompt, cfg, list(range(n)), batch_size=n)
            for stream in streams:
                "".join(stream)  # decoded to text, as `generate` prints it
            return sum(len(stream.tokens) for stream in streams)
    else:
        model = _peft_for_decoding(args)
        ids = torch.tensor([prompt], device=args.device)

        def run(tokens: int) -> int:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=True, top_k=200, temperature=1.0,
                                     num_return_sequences=n, pad_token_id=0)
            return (out.size(1) - ids.size(1)) * out.size(0)

    return {**timed(run, k, args.device), "samples": n}


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
    return {"seconds": ready - args.spawned_at, "rss_mb": resident_mb()["rss"]}
