"""The machine's own limits, measured where the figures are (`benchmark.py`'s first worker): the
dense matmul rate in float32 and bfloat16, the memory bandwidth of a large copy, and what the
figures depend on (the CPU, its vector features, native bf16, the GPU)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmark_common import sync  # the scripts folder is on sys.path


def worker_machine(args) -> dict:
    """Dense matmul FLOP/s (fp32, bf16) and memory bandwidth (a large copy)."""
    import torch

    from lora_gpt2.training.flops import measure_matmul_flops

    device = torch.device(args.device)
    if args.device == "cuda":
        native = ["CUDA"] if torch.cuda.is_bf16_supported() else []
    else:
        from lora_gpt2.devices import cpu_bf16_features

        native = cpu_bf16_features()
    # emulated bf16 runs at a few GFLOP/s: a smaller product measures it in seconds, not minutes
    sizes = {"float32": None, "bfloat16": None if native else 512}
    out = {f"matmul_{dt}_tflops": measure_matmul_flops(device, getattr(torch, dt), n=sizes[dt], repeats=5) / 1e12
           for dt in ("float32", "bfloat16")}
    out["bandwidth_gbs"] = copy_bandwidth_gbs(args.device)
    out["cpu"] = _cpu_model()
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    out["native_bf16"] = native
    return out


# the vector features a figure depends on: which kernels oneDNN picks, whether bf16 is native
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


def _cpu_model() -> str:
    """The CPU's name, its cores and the SIMD_FLAGS it has, e.g. "AMD EPYC, 2 cores, avx2 fma"."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
    except (OSError, StopIteration):
        name, flags = platform.processor() or platform.machine(), set()
    return ", ".join([name, f"{os.cpu_count()} cores", " ".join(f for f in SIMD_FLAGS if f in flags) or "flags unknown"])


def copy_bandwidth_gbs(device: str, repeats: int = 5) -> float:
    """Memory bandwidth as a large copy measures it (bytes read + written per second, best of
    `repeats`), in GB/s."""
    import torch

    x = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best / 1e9  # read + write
