"""PEFT LoRA adapters for GPT-2, both ways, written as a name map.

PEFT names a LoRA tensor `base_model.model.<HF module>.lora_A.weight` (Linear / Conv1D:
A is (r, in), B is (out, r), as ours) or `...lora_embedding_A` (embeddings: A (r, num),
B (dim, r), as ours), so conversion is renaming alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .. import layout
from ..adapters import variants
from ..atomic import write_bytes, write_text
from ..config import LoRAConfig
from ..errors import CheckpointError
from .outputs import WRITTEN_BY

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"

# (layer kind, our adapter tensor name) -> PEFT's tensor suffix, from the variants' table. An
# adapter tensor with no row there has no PEFT equivalent and is refused by name, never written wrong.
TENSOR_SUFFIXES = variants.TENSOR_SUFFIXES
# PEFT's suffix -> our local name (a suffix means one local name whatever the layer kind), with
# the ".default" adapter name older PEFT versions wrote into A and B
LOCAL_NAMES = {suffix: local for (_, local), suffix in TENSOR_SUFFIXES.items()}
LOCAL_NAMES.update({suffix.replace(".weight", ".default.weight"): local for suffix, local in list(LOCAL_NAMES.items())
                    if suffix.endswith(".weight")})
# adapter_config.json fields that change the arithmetic: refused by name unless at this value
UNSUPPORTED = {
    "use_qalora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "trainable_token_indices": (None, {}),
}


def is_peft_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _kind(module: layout.Module) -> str:
    return "embedding" if module.kind == "embedding" else "linear"


def our_to_peft_names(n_layer: int) -> dict[str, str]:
    """Every adapter tensor name of ours that PEFT can hold -> PEFT's key."""
    names = {}
    for module in layout.MODULES:
        if module.target is None:
            continue
        for ours, theirs in layout.module_paths(module, n_layer):
            for (kind, local), suffix in TENSOR_SUFFIXES.items():
                if kind == _kind(module):
                    names[f"{ours}.{local}"] = f"{PREFIX}{theirs}.{suffix}"
    return names


def _peft_target(module: layout.Module, lora: LoRAConfig) -> str:
    # With layers_to_transform, PEFT keeps only modules with a block number, except those named
    # by their whole path: so wte, wpe and lm_head are named in full, as our --layers leaves them
    if lora.layers is not None and not module.per_block:
        return module.hf
    return module.peft_target


def peft_config(lora: LoRAConfig, base_model: str | None, n_layer: int) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha_value,
        "lora_dropout": lora.dropout,
        "target_modules": [_peft_target(layout.BY_TARGET[t], lora) for t in lora.targets],
        # GPT-2's Conv1D stores (in, out); PEFT needs this to merge them (it resets it per layer)
        "fan_in_fan_out": any(layout.BY_TARGET[t].kind == "conv1d" for t in lora.targets),
        "bias": "none",
        "inference_mode": True,
        **variants.peft_keys(lora),
        "use_rslora": lora.rslora,
        # PEFT applies this to every target with a block number (not wte, wpe, lm_head), as we do
        "layers_to_transform": None if lora.layers is None else list(lora.blocks(n_layer)),
        "layers_pattern": None if lora.layers is None else "h",
        "modules_to_save": None,
    }


def export_peft(tensors: dict[str, torch.Tensor], lora: LoRAConfig, n_layer: int,
                base_model: str | None, out_dir: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel loads."""
    from safetensors.torch import save

    names = our_to_peft_names(n_layer)
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise CheckpointError(f"adapter tensor {unknown[0]!r} has no PEFT equivalent; refusing to write a wrong file")
    converted = {names[k]: v.detach().cpu().contiguous() for k, v in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(out_dir / WEIGHTS_FILE, save(converted, metadata={"format": "pt", **WRITTEN_BY}))
    write_text(out_dir / CONFIG_FILE, json.dumps(peft_config(lora, base_model, n_layer), indent=2) + "\n")


def read_peft(directory: Path):
    """(LoRAConfig, tensors by our names, base model, base-layer tensors) from a PEFT folder."""
    config_path = directory / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{config_path} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is not a PEFT adapter config (a JSON object)")
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for field, allowed in UNSUPPORTED.items():
        if field in raw and raw[field] not in allowed:
            raise CheckpointError(f"{config_path}: {field}={raw[field]!r} is not supported by lora-gpt2")
    tensors = _read_tensors(directory)
    ours: dict[str, torch.Tensor] = {}
    base_layers: dict[str, torch.Tensor] = {}
    suffixes = "|".join(re.escape(suffix) for suffix in sorted(LOCAL_NAMES, key=len, reverse=True))
    pattern = re.compile(rf"^(?:base_model\.model\.)?(.+?)\.({suffixes})$")
    reverse = {m.hf: m.ours for m in layout.MODULES if m.target}
    for key, tensor in tensors.items():
        if key.endswith(".base_layer.weight"):
            base_layers[key.removeprefix(PREFIX)] = tensor
            continue
        match = pattern.match(key)
        if not match:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {key!r} is not a LoRA tensor lora-gpt2 reads")
        module, part = match.groups()
        generic = re.sub(r"\.h\.(\d+)\.", ".h.{i}.", module)
        if generic not in reverse:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: module {module!r} has no lora-gpt2 equivalent")
        block = re.search(r"\.h\.(\d+)\.", module)
        name = reverse[generic].format(i=block.group(1) if block else "")
        ours[f"{name}.{LOCAL_NAMES[part]}"] = tensor
    targets = sorted({name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for name in ours})  # "<module>.<local>"
    try:
        variant, init = variants.from_peft(raw)
        lora = LoRAConfig(targets=tuple(targets), r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                          dropout=float(raw.get("lora_dropout") or 0.0), rslora=bool(raw.get("use_rslora") or False),
                          layers=_layers_spec(raw.get("layers_to_transform"), config_path),
                          variant=variant, init=init)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid LoRA settings ({exc})") from None
    return lora, ours, raw.get("base_model_name_or_path"), base_layers


def _layers_spec(value, config_path: Path) -> str | None:
    """PEFT's layers_to_transform (a block number or a list of them) as a --layers value."""
    if value in (None, []):
        return None
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{config_path}: layers_to_transform must be a block number or a list of them, "
                              f"got {value!r}")
    blocks = sorted(set(values))
    # one block is "k-k": a bare "k" would mean the last k blocks
    return f"{blocks[0]}-{blocks[0]}" if len(blocks) == 1 else ",".join(map(str, blocks))


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = directory / WEIGHTS_FILE
    if file.is_file():
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    legacy = directory / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{legacy} cannot be loaded safely ({exc})") from None
    raise CheckpointError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
