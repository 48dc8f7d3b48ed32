"""Hugging Face GPT-2 checkpoints in and out, written as a key map.

HF keys may carry the `transformer.` prefix (transformers' own saves) or not (the
original `gpt2` upload); both are read. Tensors go from the file straight into the
model's preallocated parameters, one at a time, so no second full copy is ever held.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .. import layout
from ..config import ACTIVATIONS, LoRAConfig, ModelConfig
from ..adapters.lora import start_adapters
from ..errors import CheckpointError
from .hub import WEIGHT_FILES, resolve_checkpoint
from ..model.gpt2 import GPT2, BaseModel

LM_HEAD = "lm_head.weight"
# Causal-mask buffers that older checkpoints saved next to the weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# config.json field -> ModelConfig field.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "n_positions",
    "n_embd": "n_embd",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_inner": "n_inner",
    "layer_norm_epsilon": "layer_norm_epsilon",
    "tie_word_embeddings": "tie_word_embeddings",
    "activation_function": "activation",
}
# Variants of GPT-2 that change the arithmetic; refuse them rather than compute wrongly.
UNSUPPORTED_FLAGS = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "scale_attn_weights": True,
    "add_cross_attention": False,
}


def hf_key_map(n_layer: int) -> dict[str, str]:
    """Every frozen tensor of our model -> its HF key (without "transformer."); lm_head excluded,
    since GPT-2 ties it to the token embedding (see `load_into`)."""
    keys = {}
    for module in layout.MODULES:
        if module.ours == "lm_head":
            continue
        for ours, theirs in layout.module_paths(module, n_layer):
            for tensor in module.tensors:
                keys[f"{ours}.{tensor}"] = f"{theirs.removeprefix('transformer.')}.{tensor}"
    return keys


# HF Conv1D stores (in, out); our Linear wants (out, in).
TRANSPOSED = tuple(".".join(m.hf.split(".")[-2:]) + ".weight" for m in layout.MODULES if m.kind == "conv1d")


def is_transposed(hf_key: str) -> bool:
    return hf_key.endswith(TRANSPOSED)


def read_config(directory: Path) -> ModelConfig:
    return model_config(read_hf_config(directory), directory / "config.json")


def read_hf_config(directory: Path) -> dict:
    """config.json as a dict, checked to be a GPT-2 config that lora-gpt2 computes exactly."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a GPT-2 checkpoint directory?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt2":
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path} is not a GPT-2 config (model_type {found!r}, expected 'gpt2')")
    for flag, expected in UNSUPPORTED_FLAGS.items():
        if raw.get(flag, expected) != expected:
            raise CheckpointError(f"{path}: {flag}={raw[flag]!r} is not supported")
    if raw.get("activation_function", "gelu_new") not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: activation_function {raw['activation_function']!r} is not supported"
        )
    return raw


def model_config(raw: dict, path: Path) -> ModelConfig:
    fields = {ours: raw[theirs] for theirs, ours in CONFIG_FIELDS.items() if theirs in raw}
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        return [directory / shard for shard in shards]
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return [legacy]
    raise CheckpointError(
        f"{directory} has no weights (looked for {', '.join(WEIGHT_FILES)})"
    )


def read_tensors(directory: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple]]:
    """(HF key without prefix, loader, shape) for every tensor, loading lazily."""
    for path in _weight_files(directory):
        if not path.is_file():
            raise CheckpointError(f"weight shard {path} is missing")
        if path.suffix == ".bin":
            yield from _read_bin(path)
        else:
            yield from _read_safetensors(path)


def _strip(key: str) -> str:
    return key.removeprefix("transformer.")


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    with handle as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())

            def load(key=key) -> torch.Tensor:
                try:
                    return f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as exc:
                    raise CheckpointError(f"{path}: tensor {key!r} is unreadable ({exc})") from None

            yield _strip(key), load, shape


def _read_bin(path: Path):
    try:  # weights_only: a pickle must never run code
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        raise CheckpointError(f"{path} is not a loadable PyTorch weights file ({exc})") from None
    for key, tensor in state.items():
        yield _strip(key), (lambda t=tensor: t), tuple(tensor.shape)


def _fingerprint_piece(key: str, tensor: torch.Tensor) -> bytes:
    """Key, shape, dtype and a strided sample of values: cheap, yet tells bases apart."""
    flat = tensor.reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].contiguous().view(torch.uint8) if flat.numel() else flat
    return f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode() + sample.numpy().tobytes()


def _fingerprint(pieces: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for key in sorted(pieces):  # file order and sharding do not matter
        digest.update(pieces[key])
    return digest.hexdigest()[:16]


def load_into(model: GPT2, directory: Path, dtype: torch.dtype, device: str | torch.device) -> str:
    """Give every frozen weight of `model` (built on the meta device) its checkpoint tensor.

    Strict: every model weight is filled once, every checkpoint tensor is used (mask
    buffers aside) and every shape is checked. Returns the base fingerprint. A float32
    tensor bound for the CPU is used as it lies in the file's memory map: no copy at all
    (a transposed Conv1D weight is a view, which matmul reads as fast).
    """
    wanted = {theirs: ours for ours, theirs in hf_key_map(model.config.n_layer).items()}
    if not model.config.tie_word_embeddings:
        wanted[LM_HEAD] = "lm_head.weight"
    params = dict(model.named_parameters(remove_duplicate=False))
    pieces: dict[str, bytes] = {}
    for key, load, shape in read_tensors(directory):
        if key.endswith(IGNORED_SUFFIXES) or (key == LM_HEAD and model.config.tie_word_embeddings):
            continue  # mask buffers; a tied lm_head saved anyway is the embedding again
        if key not in wanted:
            raise CheckpointError(f"{directory}: unexpected tensor {key!r} in the checkpoint")
        ours = wanted[key]
        target = params[ours]
        expected = tuple(reversed(target.shape)) if is_transposed(key) else tuple(target.shape)
        if shape != expected:
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {shape}, expected {expected}"
            )
        if key in pieces:
            raise CheckpointError(f"{directory}: tensor {key!r} appears twice")
        tensor = load()
        pieces[key] = _fingerprint_piece(key, tensor)
        value = (tensor.T if is_transposed(key) else tensor).to(device=device, dtype=dtype)
        module_name, _, attr = ours.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    missing = sorted(set(wanted) - set(pieces))
    if missing:
        raise CheckpointError(f"{directory}: checkpoint is missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.tie_weights()
    return _fingerprint(pieces)


def load_pretrained(
    name_or_path: str,
    *,
    targets=("qkv_projection",),
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    lora: LoRAConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    adapter: dict[str, torch.Tensor] | None = None,
    adapter_source: str = "adapter",
) -> GPT2:
    """GPT-2 with Hugging Face weights (Hub id or local directory) and LoRA layers started
    afresh, or from `adapter` (tensors as an adapter folder holds them, see start_adapters).

    The LoRA settings come from `lora`, or else from `targets` / `r` / `alpha` / `dropout`.
    The returned model declares where its weights came from in `model.base`.
    """
    directory = resolve_checkpoint(name_or_path)
    raw = read_hf_config(directory)
    config = model_config(raw, directory / "config.json")
    lora_config = lora or LoRAConfig(targets=targets, r=r, alpha=alpha, dropout=dropout)
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = GPT2(config, lora_config)
    fingerprint = load_into(model, directory, dtype, device)
    for layer in model.lora_layers().values():
        layer.materialize(device)
    start_adapters(model, adapter, adapter_source)
    model.base = BaseModel(str(name_or_path), directory, fingerprint, raw)
    return model
