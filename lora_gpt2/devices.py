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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Frozen-weight storage: `auto` is bfloat16 where the device supports it natively, else float32."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    dtype = _TORCH_DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"dtype float16 needs a CUDA device (got {device.type}); use bfloat16 or float32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
