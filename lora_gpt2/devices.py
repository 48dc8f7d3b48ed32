"""Which device and which dtype: the one place `auto` is decided, for training and inference alike."""

from __future__ import annotations

import torch

from .config import DEVICES, DTYPES
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA, then MPS, then the CPU; an explicit choice must be available."""
    if choice not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {choice!r}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if choice == "mps" and not _mps_available():
        raise ValueError("device 'mps' was asked for but MPS is not available")
    return torch.device(choice)


def cpu_bf16_features() -> list[str]:
    """This CPU's native bfloat16 arithmetic (empty where PyTorch would emulate it)."""
    cpu = getattr(torch, "cpu", None)
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return [name for name, probe in checks if getattr(cpu, probe, lambda: False)()]


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """What `auto` means on this device, and why (said in a run's first lines and adapter.json)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this GPU has bfloat16"
        return torch.float32, "this GPU has no bfloat16"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return torch.bfloat16, f"this CPU has native bfloat16 ({', '.join(features)})"
        return torch.float32, "this CPU has no native bfloat16 (AVX512-BF16 or AMX): it would be emulated"
    return torch.float32, f"float32 on {device.type}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Frozen-weight storage: `auto` is bfloat16 where the device has native bfloat16 arithmetic
    (CUDA, or a CPU with AVX512-BF16 or AMX), else float32."""
    return dtype_choice(name, device)[0]


def dtype_choice(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(the dtype, how it was chosen): "auto: <why>" or "asked for"."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    if name == "auto":
        dtype, why = auto_dtype(device)
        return dtype, f"auto: {why}"
    dtype = _TORCH_DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"dtype float16 needs a CUDA device (got {device.type}); use bfloat16 or float32")
    return dtype, "asked for"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
