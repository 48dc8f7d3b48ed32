"""Adapter-only checkpoints and training state, written atomically and checked on load.

A checkpoint is a folder: `adapter.safetensors` (the LoRA tensors alone), `adapter.json`
(everything needed to use it without the training config) and, for `last/`, `state.pt`
(optimiser, scheduler, step, RNG) for `--resume`. A folder is written under a temporary
name and swapped in whole, so a crash leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import TMP_MARK, atomic_open, fsync_dir, remove_stale_temps, write_bytes, write_text
from .config import LoRAConfig
from .errors import CheckpointError, WriteError
from .lora import lora_parameters
from .model import GPT2

ADAPTER_FORMAT = "lora-gpt2-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
STATE_FILE = "state.pt"
PREVIOUS = ".prev-"


@dataclass(frozen=True)
class AdapterInfo:
    """What adapter.json says."""

    path: Path
    base_model: str
    base_fingerprint: str | None
    lora: LoRAConfig
    meta: dict[str, Any]


def adapter_meta(model: GPT2, **extra: Any) -> dict[str, Any]:
    cfg = model.lora_config
    return {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_gpt2_version": __version__,
        "base_model": getattr(model, "source", None),
        "base_fingerprint": getattr(model, "fingerprint", None),
        "base_config": asdict(model.config),
        "lora": {"targets": list(cfg.targets), "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout},
        "tokenizer": "gpt2",
        **extra,
    }


def _adapter_bytes(model: GPT2) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_parameters(model).items()}
    return save(tensors, metadata={"format": ADAPTER_FORMAT, "format_version": str(FORMAT_VERSION)})


def write_adapter_files(model: GPT2, directory: Path, **extra: Any) -> None:
    """adapter.safetensors, then adapter.json carrying its sha256 (detects any mismatch)."""
    data = _adapter_bytes(model)
    write_bytes(directory / ADAPTER_FILE, data)
    meta = adapter_meta(model, adapter_sha256=hashlib.sha256(data).hexdigest(), **extra)
    write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")


def save_checkpoint(directory: Path, model: GPT2, state: dict | None = None, **extra: Any) -> None:
    """Write a whole checkpoint folder under a temporary name, then swap it in."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{TMP_MARK}{os.getpid()}-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_adapter_files(model, tmp, **extra)
        if state is not None:
            with atomic_open(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
        _swap_in(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"cannot write checkpoint {directory}: {exc.strerror or exc}; "
                             "the previous checkpoint is intact") from None
        raise


def _swap_in(tmp: Path, directory: Path) -> None:
    previous = directory.with_name(PREVIOUS + directory.name)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)  # a crash here: recover_checkpoint puts it back
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(previous, ignore_errors=True)


def recover_checkpoint(directory: Path) -> None:
    """Finish or undo a swap that a crash interrupted; drop stale temporaries."""
    directory = Path(directory)
    previous = directory.with_name(PREVIOUS + directory.name)
    if previous.exists():
        if directory.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, directory)
    remove_stale_temps(directory.parent)


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """Find and check adapter.json in an adapter folder or a run folder (then its best/ or last/)."""
    directory = find_adapter_dir(path)
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path} is not valid JSON (truncated or corrupted?)") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{meta_path} is not a lora-gpt2 adapter description")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {version!r}, newer than this lora-gpt2 "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade lora-gpt2"
        )
    lora = meta.get("lora") or {}
    try:
        cfg = LoRAConfig(targets=tuple(lora["targets"]), r=lora["r"], alpha=lora.get("alpha"),
                         dropout=lora.get("dropout", 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} has invalid LoRA settings ({exc})") from None
    return AdapterInfo(directory, meta.get("base_model") or "", meta.get("base_fingerprint"), cfg, meta)


def find_adapter_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"adapter {str(path)!r} does not exist")
    if path.is_file():
        path = path.parent
    for name in ("best", "last"):
        if (path / f"{PREVIOUS}{name}").exists():
            recover_checkpoint(path / name)
    for candidate in (path, path / "best", path / "last"):
        if (candidate / META_FILE).is_file():
            return candidate
    raise CheckpointError(f"{path} holds no adapter ({META_FILE} and {ADAPTER_FILE} are missing)")


def load_adapter_tensors(model: GPT2, info: AdapterInfo) -> None:
    """Copy the adapter's tensors into the model's LoRA parameters, strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    file = info.path / ADAPTER_FILE
    if not file.is_file():
        raise CheckpointError(f"{info.path} has {META_FILE} but no {ADAPTER_FILE}")
    data = file.read_bytes()
    expected_sha = info.meta.get("adapter_sha256")
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(f"{file} does not match the sha256 in {META_FILE} (corrupted or truncated)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    copy_lora_tensors(model, tensors, str(file))


def copy_lora_tensors(model: GPT2, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into the model's LoRA parameters: the same names, the same shapes, all of them."""
    params = lora_parameters(model)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"{source}: {what}")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensors[name])


def load_state(directory: Path) -> dict:
    """state.pt, loaded with weights_only=True: a pickle can never run code here."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; nothing to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} cannot be loaded safely ({reason})") from None
