"""`--only quantize`: int8 weight-only decoding against float decoding, speed and accuracy, in one run.

Speed: batch-1 greedy decoding of `--new-tokens` tokens through a session as `generate` makes it,
float32 and int8 (and bf16 where the CPU has it natively), each in its own process, alternating
for `--repeats` rounds; each figure is the median of its rounds. Accuracy, in one process, on
the random base model and on an adapter trained for QUANT_TRAIN_STEPS steps by `lora-gpt2 train`:
- perplexity on Tiny Shakespeare's val split (QUANT_WINDOWS windows of 256 tokens) in float32
  and int8, the adapter folded before quantising and applied unfolded beside int8 weights;
- greedy agreement with float32 over `--new-tokens` tokens from a Shakespeare prompt: how many
  tokens the int8 text shares before its first different token, and, feeding both models the
  float32 text, at how many positions their argmax agrees.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

QUANT_TRAIN_STEPS = 60
QUANT_WINDOWS = 16


def run(args, spawn, native_bf16: bool) -> dict:
    results: dict = {}
    formats = [("float32", "none"), ("float32", "int8")] + ([("bfloat16", "none")] if native_bf16 else [])
    rounds: dict = {}
    for _ in range(args.repeats):
        for dtype, quantize in formats:
            got = spawn(args, "quantize_speed", "lora-gpt2", dtype, variant=quantize)
            print(f"  quantize speed {dtype} {quantize}: {got}", file=sys.stderr)
            rounds.setdefault(f"quant_speed_{dtype}_{quantize}", []).append(got)
    for key, got in rounds.items():
        got.sort(key=lambda g: g["tokens_per_s"])
        results[key] = {**got[len(got) // 2], "all_rounds": [g["tokens_per_s"] for g in got]}
    results["quant_accuracy"] = got = spawn(args, "quantize_accuracy", "lora-gpt2")
    print(f"  quantize accuracy: {got}", file=sys.stderr)
    return results


def worker_speed(args) -> dict:
    """Batch-1 greedy tokens/s of a session whose weights are in format `--variant`."""
    from benchmark_common import peak_memory_mb, resident_mb, session as make_session
    from benchmark_profile import _decode_parts  # one step against its products alone, as --only profile
    from benchmark_workers import _batches, _rounds_with_bandwidth
    from lora_gpt2.inference.sampling import SamplingConfig

    prompt = _batches(args)[1].tolist()
    session = make_session(args, quantize=args.variant)

    def go(k: int) -> int:
        stream = session.stream(prompt, SamplingConfig(max_new_tokens=k, temperature=0))
        "".join(stream)
        return len(stream.tokens)

    go(args.new_tokens)  # what `generate` holds at most: loading, the copies and one whole decode
    resident = resident_mb()
    memory = {"anon_mb": resident.get("anon", 0), "file_mb": resident.get("file", 0),
              "peak_rss_mb": peak_memory_mb(args.device)}
    got = _rounds_with_bandwidth(go, args.new_tokens, args.device)  # after: the bandwidth probe takes 512 MB
    got.update(_decode_parts(session))
    return {**got, **memory, "copies_mb": session.layout.describe()["bytes"] / 1e6}


def _train_adapter(args, out: Path) -> None:
    cmd = [sys.executable, "-m", "lora_gpt2", "train", "--model", str(args.checkpoint), "--data", args.data,
           "--out", str(out), "--targets", "attn,ffn", "--rank", str(args.rank), "--lr", "3e-3",
           "--max-steps", str(QUANT_TRAIN_STEPS), "--batch-size", "4", "--block-size", "128",
           "--eval-interval", str(QUANT_TRAIN_STEPS), "--eval-batches", "2", "--dtype", "float32",
           "--device", args.device, "--dropout", "0"]
    subprocess.run(cmd, check=True, capture_output=True)


def worker_accuracy(args) -> dict:
    import math

    import numpy as np
    import torch

    from lora_gpt2 import load_pretrained
    from lora_gpt2.checkpoints import load_with_adapter
    from lora_gpt2.inference.layouts import DecodeLayout
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.session import generate
    from lora_gpt2.model.gpt2 import KVCache

    val = np.fromfile(Path(args.data) / "val.bin", dtype=np.uint16).astype(np.int64)
    step = (len(val) - 257) // QUANT_WINDOWS
    windows = torch.stack([torch.from_numpy(val[i * step: i * step + 257]) for i in range(QUANT_WINDOWS)])
    prompt = val[:16].tolist()

    def perplexity(model) -> float:
        total = 0.0
        with torch.inference_mode():
            for w in windows.split(4):
                logits = model(w[:, :-1])  # through each linear's forward: the int8 copy where installed
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(),
                                                           reduction="sum").item()
        return math.exp(total / windows[:, 1:].numel())

    def greedy(model) -> list[int]:
        return list(generate(model, prompt, SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)))

    def agreement(model, reference: list[int]) -> dict:
        mine = greedy(model)
        shared = next((i for i, (a, b) in enumerate(zip(mine, reference)) if a != b), len(reference))
        ids = torch.tensor([prompt + reference[:-1]])
        with torch.inference_mode():  # teacher-forced on the float text, one step at a time as decoding
            picks = []
            cache = KVCache.empty(model.config, 1, model.frozen_dtype(), "cpu", ids.size(1))
            picks.append(model(ids[:, :len(prompt)], cache, at=-1).argmax(-1).item())
            for t in range(len(prompt), ids.size(1)):
                picks.append(model(ids[:, t:t + 1], cache, at=-1).argmax(-1).item())
        same = sum(a == b for a, b in zip(picks, reference))
        return {"shared_prefix": shared, "argmax_agreement": same / len(reference)}

    def measure(model, adapted: bool) -> dict:
        got: dict = {}
        reference = None
        for name, quantize, fold in [("float32", "none", None), ("int8", "int8", True)] + (
                [("int8_unfolded", "int8", False)] if adapted else []):
            with DecodeLayout(model, quantize, fold=fold):
                got[f"{name}_perplexity"] = perplexity(model)
                if reference is None:
                    reference = greedy(model)
                else:
                    got[f"{name}_agreement"] = agreement(model, reference)
        return got

    base = load_pretrained(args.checkpoint, targets=(), device=args.device).eval()
    results = {"base": measure(base, adapted=False), "tokens": args.new_tokens, "windows": QUANT_WINDOWS}
    with tempfile.TemporaryDirectory() as tmp:
        _train_adapter(args, Path(tmp) / "run")
        net, _ = load_with_adapter(str(Path(tmp) / "run" / "last"), model=str(args.checkpoint), dtype="float32",
                                   device=args.device)
    results["adapter"] = measure(net.eval(), adapted=True)
    results["train_steps"] = QUANT_TRAIN_STEPS
    return results


def lines(results: dict) -> list[str]:
    out = []
    speeds = {k[len("quant_speed_"):]: v for k, v in results.items() if k.startswith("quant_speed_")}
    if speeds:
        fp32 = speeds["float32_none"]["tokens_per_s"]
        out += ["", "int8 weight-only decoding (`--quantize int8`), batch 1, greedy, median of the rounds; memory "
                "after loading, making the copies and one decode, before the bandwidth probes (resident: the "
                "process's own memory / the checkpoint's memory-mapped pages, which the kernel can drop):", "",
                "| weights | tokens/s | vs float32 | copies MB | peak RSS MB | resident anonymous / file MB | rounds |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for key, got in speeds.items():
            out.append(f"| {key.replace('_none', '').replace('float32_int8', 'int8 (a float32 model)')} | "
                       f"{got['tokens_per_s']:.1f} | {got['tokens_per_s'] / fp32:.2f}× | {got['copies_mb']:,.0f} | "
                       f"{got['peak_rss_mb']:,.0f} | {got.get('anon_mb', 0):,.0f} / {got.get('file_mb', 0):,.0f} | "
                       f"{', '.join(f'{r:.1f}' for r in got['all_rounds'])} |")
        for key, got in speeds.items():
            if "parts_step_ms" in got:
                step, alone = got["parts_step_ms"], got["parts_products_ms"]
                read = got["parts_weight_bytes"]
                out.append(f"{key}: one decoding step {step:.1f} ms, its {got['parts_products']} products alone "
                           f"{alone:.1f} ms ({100 * alone / step:.0f}%), reading {read / 1e6:,.0f} MB at "
                           f"{read / alone / 1e6:.1f} GB/s; the ops between {step - alone:.1f} ms")
    acc = results.get("quant_accuracy")
    if acc:
        out += ["", f"int8 accuracy (Tiny Shakespeare val, {acc['windows']} windows of 256; greedy over "
                f"{acc['tokens']} tokens; the adapter trained {acc['train_steps']} steps):", "",
                "| model | weights | perplexity | tokens shared before the first difference | argmax agreement |",
                "| --- | --- | ---: | ---: | ---: |"]
        for model in ("base", "adapter"):
            got = acc[model]
            for name in ("float32", "int8", "int8_unfolded"):
                if f"{name}_perplexity" not in got:
                    continue
                a = got.get(f"{name}_agreement")
                shared = str(a["shared_prefix"]) if a else "—"
                agree = f"{100 * a['argmax_agreement']:.1f}%" if a else "—"
                label = name.replace("_", ", adapter ")
                out.append(f"| {model} | {label} | {got[f'{name}_perplexity']:.3f} | {shared} | {agree} |")
    return out
