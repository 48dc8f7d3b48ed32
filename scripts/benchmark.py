#!/usr/bin/env python3
"""lora-gpt2 vs transformers + PEFT, side by side, in one run on one machine.

    python scripts/benchmark.py --data data/tinyshakespeare            # CPU, GPT-2 small shape
    python scripts/benchmark.py --data data/tinyshakespeare --device cuda --steps 50
    python scripts/benchmark.py --json                                  # machine-readable
    python scripts/benchmark.py --only examples,prepare                 # prompt/completion data only
    python scripts/benchmark.py --only profile,compiled                 # where a step's and a token's time goes
    python scripts/benchmark.py --only quantize                         # int8 decoding: speed and accuracy

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


# the script's folder is on sys.path; each worker runs in its own process (see `spawn`)
import benchmark_compiled as compiled, benchmark_machine as machine, benchmark_profile as prof  # noqa: E402
import benchmark_quantize, benchmark_serve, benchmark_workers as w  # noqa: E402

WORKERS = {"machine": machine.worker_machine, "train": w.worker_train, "generate": w.worker_generate,
           "startup": w.worker_startup, "samples": w.worker_samples, "examples": w.worker_examples,
           "prepare": w.worker_prepare, "profile": prof.worker_profile, "decode_profile": prof.worker_decode_profile,
           "decode_compiled": compiled.worker_decode_compiled, "serve_peft": benchmark_serve.worker_serve_peft,
           "quantize_speed": benchmark_quantize.worker_speed, "quantize_accuracy": benchmark_quantize.worker_accuracy}

# ---------------------------------------------------------------- the parent: plan, run, report
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # what lora-gpt2's training sets itself (allocator.py)


def spawn(args, task: str, system: str = "", dtype: str = "float32", layers: str | None = None,
          variant: str = "lora", grad_ckpt: bool = False, samples: int = 1, env: dict | None = None,
          adapters: str = "", **shape) -> dict:
    """One measurement in a fresh process; `shape` overrides batch_size, block_size, steps, warmup
    or memory_cap_mb for it."""
    s = {k: shape.get(k, getattr(args, k)) for k in ("batch_size", "block_size", "steps", "warmup", "memory_cap_mb")}
    cmd = [sys.executable, __file__, "--worker", task, "--system", system, "--dtype", dtype,
           "--checkpoint", str(args.checkpoint), "--data", args.data, "--device", args.device,
           "--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--batch-size", str(s["batch_size"]),
           "--block-size", str(s["block_size"]), "--rank", str(args.rank), "--new-tokens", str(args.new_tokens),
           "--spawned-at", repr(time.time()), "--samples", str(samples),
           "--memory-cap-mb", str(s["memory_cap_mb"] or 0)] + (["--compile"] if args.compile else []) + \
        (["--layers", layers] if layers else []) + ["--variant", variant] + (["--grad-ckpt"] if grad_ckpt else []) + \
        (["--adapters", adapters] if adapters else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           **(env or {})}
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
    from lora_gpt2.training.flops import lora_training_flops_per_token

    n_layer, n_head, n_embd = SIZES[size]
    return lora_training_flops_per_token(ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd), block)


def model_bytes(size: str, dtype: str) -> float:
    n_layer, _, d = SIZES[size]
    params = n_layer * 12 * d * d + 50257 * d + 1024 * d
    return params * (2 if dtype == "bfloat16" else 4)


SECTIONS = ("train", "generate", "examples", "prepare", "layers", "dora", "checkpointing", "samples", "profile",
            "compiled", "serve", "quantize")


def run(args) -> dict:
    results: dict = {"config": {k: getattr(args, k) for k in
                                ("size", "device", "batch_size", "block_size", "rank", "steps", "warmup",
                                 "new_tokens", "repeats", "compile", "only", "cap_mb")}}
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
        last = max(1, SIZES[args.size][0] // 3)  # the last third of the blocks: 4 of GPT-2 small's 12
        results["layers_last"] = {**spawn(args, "train", "lora-gpt2", layers=str(last)), "blocks": last}
        print(f"  layers: all {results['layers_all']} last {last} {results['layers_last']}", file=sys.stderr)
    if "checkpointing" in only:  # --grad-checkpoint against transformers' gradient checkpointing
        # bfloat16 where the machine has it natively (emulated bf16 is what `--dtype auto` avoids)
        dtypes = ("float32", "bfloat16") if results["machine"]["native_bf16"] else ("float32",)
        for dtype in dtypes:
            for ckpt in (False, True):
                for system in ("lora-gpt2", "peft"):
                    key = f"ckpt_{dtype}_{'on' if ckpt else 'off'}_{system}"
                    results[key] = got = spawn(args, "train", system, dtype, grad_ckpt=ckpt)
                    print(f"  {key}: {got}", file=sys.stderr)
        # PEFT under the allocator setting lora-gpt2's training makes for itself
        results["ckpt_float32_on_peft-fixed-malloc"] = got = spawn(args, "train", "peft", grad_ckpt=True,
                                                                    env=FIXED_MALLOC)
        print(f"  ckpt_float32_on_peft with MALLOC_MMAP_THRESHOLD_: {got}", file=sys.stderr)
        # a batch of 8 x 1024 under one memory cap, both with checkpointing on and the same
        # allocator setting: one step each
        big = dict(batch_size=8, block_size=1024, steps=1, warmup=0, memory_cap_mb=args.cap_mb)
        for system in ("lora-gpt2", "peft"):
            results[f"cap_{system}"] = got = spawn(args, "train", system, grad_ckpt=True, env=FIXED_MALLOC, **big)
            print(f"  cap {args.cap_mb} MB {system}: {got}", file=sys.stderr)
    if "samples" in only:  # N completions of one prompt, decoded together; best of --repeats rounds
        for _ in range(args.repeats):
            for system in ("lora-gpt2", "peft"):
                for n in (1, 4):
                    got = spawn(args, "samples", system, samples=n)
                    print(f"  samples {n} {system}: {got}", file=sys.stderr)
                    best = results.get(f"samples_{n}_{system}")
                    if best is None or got["tokens_per_s"] > best["tokens_per_s"]:
                        results[f"samples_{n}_{system}"] = got
    if "profile" in only:  # where lora-gpt2's training step spends its time
        for dtype in ("float32", "bfloat16") if results["machine"]["native_bf16"] else ("float32",):
            results[f"profile_{dtype}"] = got = spawn(args, "profile", "lora-gpt2", dtype)
            print(f"  profile {dtype}: {got}", file=sys.stderr)
        results["profile_decode"] = got = spawn(args, "decode_profile", "lora-gpt2")
        print(f"  profile decode: {got}", file=sys.stderr)
    if "compiled" in only and args.device == "cpu":  # a captured decoding step against the eager one
        results["decode_compiled"] = got = spawn(args, "decode_compiled", "lora-gpt2")
        print(f"  compiled decode: {got}", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    if "serve" in only:  # lora-gpt2 serve under concurrent clients over 4 adapters (benchmark_serve.py)
        results.update(benchmark_serve.run(args, spawn))
    if "quantize" in only:  # int8 weight-only decoding: speed against float, and accuracy (benchmark_quantize.py)
        results.update(benchmark_quantize.run(args, spawn, results["machine"]["native_bf16"]))
    flops = flops_per_token(args.size, args.block_size)
    m = results["machine"]
    derived = results["derived"] = {"flops_per_token": flops}
    if "train" in only:
        derived["mfu_bfloat16"] = (results["train_bfloat16_lora-gpt2"]["tokens_per_s"] * flops
                                   / (m["matmul_bfloat16_tflops"] * 1e12))
        derived["mfu_float32"] = (results["train_float32_lora-gpt2"]["tokens_per_s"] * flops
                                  / (m["matmul_float32_tflops"] * 1e12))
    if "generate" in only:
        got = results["generate_lora-gpt2"]  # against the bandwidth measured around its own rounds
        derived["decode_bandwidth_fraction"] = (got["tokens_per_s_at_that_bandwidth"] * model_bytes(args.size, "float32")
                                                / (got["bandwidth_gbs"] * 1e9))
    return results


ROWS = [  # (label, key, field, higher is better, target ratio, (derived share, of which limit) or None)
    ("training tokens/s, float32", "train_float32", "tokens_per_s", True, 1.25, ("mfu_float32", "fp32 matmul rate")),
    ("training tokens/s, bf16 mode vs PEFT + autocast", "train_bfloat16", "tokens_per_s", True, 2.0,
     ("mfu_bfloat16", "bf16 matmul rate")),
    ("training peak memory MB, float32", "train_float32", "peak_mb", False, 0.45, None),
    ("training peak memory MB, bf16", "train_bfloat16", "peak_mb", False, 0.45, None),
    ("batch-1 generation tokens/s", "generate", "tokens_per_s", True, 3.0,
     ("decode_bandwidth_fraction", "bandwidth bound")),
    ("start-up to first logits, s", "startup", "seconds", False, 0.6, None),
    ("memory after first logits MB", "startup", "rss_mb", False, None, None),
]


def table(results: dict) -> str:
    lines = ["| figure | lora-gpt2 | transformers + PEFT | ratio | target | lora-gpt2's share of this machine's limit |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for label, key, field, higher, target, share in ROWS:
        if f"{key}_lora-gpt2" not in results:
            continue
        ours, theirs = results[f"{key}_lora-gpt2"][field], results[f"{key}_peft"][field]
        ratio = ours / theirs
        goal = "" if target is None else (f"≥ {target}×" if higher else f"≤ {target}×")
        of = "" if share is None or share[0] not in results["derived"] else \
            f"{100 * results['derived'][share[0]]:.0f}% of the {share[1]}"
        lines.append(f"| {label} | {ours:,.1f} | {theirs:,.1f} | {ratio:.2f}× | {goal} | {of} |")
    m, d = results["machine"], results["derived"]
    lines += [
        "",
        f"machine: matmul {m['matmul_float32_tflops'] * 1000:,.0f} GFLOP/s fp32, "
        f"{m['matmul_bfloat16_tflops'] * 1000:,.0f} GFLOP/s bf16; copy bandwidth {m['bandwidth_gbs']:.1f} GB/s; "
        f"{m['gpu'] + ' on ' if 'gpu' in m else ''}{m['cpu']}, native bf16: {', '.join(m['native_bf16']) or 'none'}",
    ]
    if "mfu_float32" in d:
        lines.append(f"training MFU (FLOPs/token = 4·N_matmul + 8·L·T·d = {d['flops_per_token'] / 1e6:,.0f} M): "
                     f"bf16 mode {100 * d['mfu_bfloat16']:.0f}% of measured bf16 matmul, "
                     f"float32 {100 * d['mfu_float32']:.0f}% of measured fp32 matmul (target ≥ 60% in bf16)")
    if "decode_bandwidth_fraction" in d:
        got = results["generate_lora-gpt2"]
        lines.append(f"decoding: {100 * d['decode_bandwidth_fraction']:.0f}% of the bandwidth bound (fp32 weights "
                     f"read once per token; copy bandwidth {got['bandwidth_gbs']:.1f} GB/s around the decode's "
                     f"median round; rounds {', '.join(f'{r:.1f}' for r in got['rounds'])} tokens/s)")
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
        every, last = results["layers_all"], results["layers_last"]
        lines.append(f"adapters on the last {last['blocks']} blocks (--layers {last['blocks']}) vs all: "
                     f"{last['tokens_per_s']:,.0f} vs "
                     f"{every['tokens_per_s']:,.0f} tokens/s ({last['tokens_per_s'] / every['tokens_per_s']:.2f}×), "
                     f"peak memory {last['peak_mb']:,.0f} vs {every['peak_mb']:,.0f} MB")
    lines += _checkpointing_lines(results) + _samples_lines(results) + _profile_lines(results) + \
        benchmark_serve.lines(results) + benchmark_quantize.lines(results)
    return "\n".join(lines)


def _checkpointing_lines(results: dict) -> list[str]:
    if "ckpt_float32_on_lora-gpt2" not in results:
        return []
    lines = ["", "gradient checkpointing (batch of the training rows; PEFT with transformers' own checkpointing):",
             "| dtype | checkpointing | lora-gpt2 tokens/s | PEFT tokens/s | lora-gpt2 peak MB | PEFT peak MB | "
             "memory ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for dtype in ("float32", "bfloat16"):
        if f"ckpt_{dtype}_on_lora-gpt2" not in results:
            lines.append(f"| {dtype} | not measured: this machine has no native {dtype} | | | | | |")
            continue
        for state in ("off", "on"):
            ours, theirs = results[f"ckpt_{dtype}_{state}_lora-gpt2"], results[f"ckpt_{dtype}_{state}_peft"]
            lines.append(f"| {dtype} | {state} | {ours['tokens_per_s']:,.0f} | {theirs['tokens_per_s']:,.0f} | "
                         f"{ours['peak_mb']:,.0f} | {theirs['peak_mb']:,.0f} | "
                         f"{ours['peak_mb'] / theirs['peak_mb']:.2f}× |")
    fixed = results["ckpt_float32_on_peft-fixed-malloc"]["peak_mb"]
    ours = results["ckpt_float32_on_lora-gpt2"]["peak_mb"]
    lines.append(f"PEFT with checkpointing and lora-gpt2's allocator setting (MALLOC_MMAP_THRESHOLD_=1 MB), "
                 f"float32: peak {fixed:,.0f} MB; lora-gpt2 {ours / fixed:.2f}× of it")
    cap = results["config"]["cap_mb"]
    for system in ("lora-gpt2", "peft"):
        got = results[f"cap_{system}"]
        what = (f"completed, {got['tokens_per_s']:,.0f} tokens/s, peak {got['peak_mb']:,.0f} MB" if got["completed"]
                else f"failed: {got['error'][:90]}")
        lines.append(f"batch 8 × 1024 under a {cap:,} MB cap, checkpointing on, {system}: {what}")
    return lines


def _samples_lines(results: dict) -> list[str]:
    if "samples_4_lora-gpt2" not in results:
        return []
    lines = [""]
    for system in ("lora-gpt2", "peft"):
        one, four = results[f"samples_1_{system}"], results[f"samples_4_{system}"]
        lines.append(f"sampling 4 completions of one prompt, {system}: {four['tokens_per_s']:,.1f} tokens/s in all "
                     f"vs {one['tokens_per_s']:,.1f} for one sample ({four['tokens_per_s'] / one['tokens_per_s']:.2f}×)")
    return lines


def _profile_lines(results: dict) -> list[str]:
    lines = []
    for dtype in ("float32", "bfloat16"):
        got = results.get(f"profile_{dtype}")
        if got is None:
            continue
        wall, parts = got["wall_ms_per_step"], got["ms_per_step"]
        shares = ", ".join(f"{kind} {100 * ms / wall:.0f}%" for kind, ms in sorted(parts.items(), key=lambda kv: -kv[1]))
        lines += ["", f"lora-gpt2 training step, {dtype}, {wall:,.0f} ms (PyTorch profiler, ops' own time): {shares}"]
    got = results.get("profile_decode")
    if got is not None:
        wall, parts = got["profiled_ms_per_token"], got["ms_per_token_by_kind"]
        shares = ", ".join(f"{kind} {100 * ms / wall:.0f}%" for kind, ms in sorted(parts.items(), key=lambda kv: -kv[1]))
        weights = model_bytes(results["config"]["size"], "float32")
        matmul_s = parts["matmuls"] / wall * got["ms_per_token"] / 1000  # the profiled share of the unprofiled time
        lines += ["", f"lora-gpt2 batch-1 greedy decoding, float32: {got['ms_per_token']:.1f} ms per token "
                      f"({1000 / got['ms_per_token']:.1f} tokens/s; {wall:.1f} ms under the profiler): {shares}; "
                      f"the matmuls read the weights at about {weights / matmul_s / 1e9:.1f} GB/s "
                      f"(copy bandwidth {results['machine']['bandwidth_gbs']:.1f} GB/s)"]
        if "parts_step_ms" in got:
            step, alone, gbs = got["parts_step_ms"], got["parts_products_ms"], got["parts_bandwidth_gbs"]
            bound_ms = got["parts_weight_bytes"] / (gbs * 1e9) * 1000
            lines.append(f"one decoding step (forward of one token and its argmax) {step:.1f} ms; its "
                         f"{got['parts_products']} packed products alone {alone:.1f} ms, reading "
                         f"{got['parts_weight_bytes'] / 1e6:,.0f} MB at {got['parts_weight_bytes'] / alone / 1e6:.1f} GB/s "
                         f"(copy bandwidth {gbs:.1f} GB/s in the same rounds): the products alone are "
                         f"{100 * bound_ms / alone:.0f}% of the bandwidth bound, the step {100 * bound_ms / step:.0f}%; "
                         f"the other {step - alone:.1f} ms are the ops between the products and Python")
    got = results.get("decode_compiled")
    if got is not None and "unavailable" in got:
        lines.append(f"a compiled decoding step could not be measured here: {got['unavailable']}")
    elif got is not None:
        lines.append(f"a compiled decoding step (torch.compile, static shapes, the packed products as a custom op): "
                     f"{got['compiled_tokens_per_s']:.1f} tokens/s against {got['eager_tokens_per_s']:.1f} for the "
                     f"eager step (median of 5 alternating rounds; compiling took {got['compile_s']:.0f} s)")
    return lines


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
    p.add_argument("--cap-mb", type=int, default=2560,
                   help="checkpointing: the memory cap (data segment, MB) of the 8 x 1024 batch")
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--memory-cap-mb", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--layers", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--adapters", default="", help=argparse.SUPPRESS)
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
