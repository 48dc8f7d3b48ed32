"""What every benchmark worker shares: device sync, timing, peak and resident memory, dtype names and the
lora-gpt2 decoding session. Imports no other benchmark module, so none of them import in a circle."""

from __future__ import annotations

import time
from pathlib import Path


def sync(device: str) -> None:
    """Wait for the device's queued work (a GPU's), so that a clock read after it means something."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def resident_mb(pid: int | str = "self") -> dict:
    """A process's resident memory now, as Linux counts it: all of it (rss), its own allocations
    (anon) and mapped file pages (file: a checkpoint's memory map, which the kernel can drop and
    read again). Empty where /proc is not there."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    return {fields[k]: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in status)
            if k in fields}


def session(args, quantize: str = "none"):
    """lora-gpt2's side of the decoding figures: a session, as `generate` uses (the frozen weights
    get their decode-time copies, in `quantize`'s format), over GPT-2 with a LoRA on qkv_projection."""
    from lora_gpt2 import load_pretrained
    from lora_gpt2.inference.session import GenerationSession

    return GenerationSession(load_pretrained(args.checkpoint, targets=("qkv_projection",), r=args.rank,
                                             device=args.device, dtype=dtype(args.dtype)).eval(), quantize=quantize)


def timed(run, tokens: int, device: str) -> dict:
    """Tokens/s of run(tokens) (which returns the tokens it made), after a short warm-up."""
    run(8)
    made, speed = measure(run, tokens, device)
    return {"tokens_per_s": speed, "tokens": made}


def measure(run, tokens: int, device: str) -> tuple[int, float]:
    """(tokens made, tokens/s) of one run(tokens)."""
    sync(device)
    start = time.perf_counter()
    made = run(tokens)
    sync(device)
    return made, made / (time.perf_counter() - start)


def dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
