"""Base model + adapter for inference: lora-gpt2 adapters and PEFT LoRA folders alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import adapter_dir, peft
from ..chat_template import TOKENIZER_CONFIG, ChatTemplate, from_record, holds_template, load
from ..adapters.lora import start_adapters
from ..config import LoRAConfig
from ..devices import pick_device, resolve_dtype
from ..errors import CheckpointError
from ..model.gpt2 import GPT2
from .hf import LM_HEAD, hf_key_map, load_pretrained


@dataclass(frozen=True)
class Adapter:
    """An adapter read from disk, whole and consistent: its settings, tensors (by our names) and base."""

    path: Path
    kind: str  # "lora-gpt2" or "peft"
    lora: LoRAConfig
    tensors: dict[str, torch.Tensor]
    base_model: str
    base_fingerprint: str | None
    meta: dict = field(default_factory=dict)  # a lora-gpt2 adapter's adapter.json
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT's saved base weights

    @property
    def eval_settings(self) -> dict:
        return self.meta.get("eval") or {}

    @property
    def trained_template(self) -> ChatTemplate | None:
        """The template the adapter was trained with (adapter.json's, or a PEFT folder's
        tokenizer_config.json's); None for an adapter trained on other data."""
        if "chat_template" in self.meta:
            return from_record(self.meta["chat_template"], str(self.path / adapter_dir.META_FILE))
        config = self.path / TOKENIZER_CONFIG
        if self.kind == "peft" and config.is_file() and holds_template(config):
            return load(config)
        return None

    @property
    def chat_template(self) -> ChatTemplate:
        """How conversations are rendered for it: its trained template, else the default one."""
        return self.trained_template or ChatTemplate()


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter folder, a run folder (its best/, else last/) or a PEFT folder. Read-only."""
    path = Path(path).expanduser()
    if path.is_dir() and peft.is_peft_dir(path):
        lora, tensors, base, base_layers = peft.read_peft(path)
        return Adapter(path, "peft", lora, tensors, base or "", None, {}, base_layers)
    ckpt = adapter_dir.read_checkpoint(path)
    info = ckpt.info
    return Adapter(info.path, "lora-gpt2", info.lora, ckpt.tensors, info.base_model, info.base_fingerprint,
                   info.meta)


def apply_adapter(model: GPT2, adapter: Adapter) -> None:
    """Copy the adapter's tensors into `model` (built with the adapter's LoRA settings)."""
    source = str(adapter.path / (adapter_dir.ADAPTER_FILE if adapter.kind == "lora-gpt2" else peft.WEIGHTS_FILE))
    start_adapters(model, adapter.tensors, source)
    check_base_layers(model, adapter)


def check_base_layers(model: GPT2, adapter: Adapter) -> None:
    """PEFT saves tied embedding weights beside the adapter; accept them only if unchanged."""
    ours_by_hf = {f"transformer.{theirs}": ours for ours, theirs in hf_key_map(model.config.n_layer).items()}
    ours_by_hf[LM_HEAD] = "lm_head.weight"
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in adapter.base_layers.items():
        hf_key = key.replace(".base_layer.weight", ".weight")
        ours = ours_by_hf.get(hf_key)
        if ours is None or not torch.equal(params[ours].detach().cpu().to(tensor.dtype), tensor):
            raise CheckpointError(f"{adapter.path}: {key} differs from the base model's weight; "
                                  "lora-gpt2 imports LoRA tensors only")


def load_with_adapter(adapter_path: str | None, *, model: str | None = None, dtype: torch.dtype | str = torch.float32,
                      device: torch.device | str = "cpu", force: bool = False) -> tuple[GPT2, Adapter | None]:
    """The base model (from `model`, else the adapter's record) with the adapter applied, in eval mode.

    `dtype` and `device` may be names ("auto", "bfloat16", "cuda", ...), resolved as training does.
    """
    if isinstance(device, str):
        device = pick_device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    adapter = read_adapter(adapter_path) if adapter_path else None
    base = model or (adapter.base_model if adapter else "")
    if not base:
        raise ValueError("no base model: pass --model (the adapter does not name its base)")
    lora = adapter.lora if adapter else LoRAConfig(targets=())
    net = load_pretrained(base, lora=lora, dtype=dtype, device=device)
    if adapter is not None:
        expected = adapter.base_fingerprint
        if expected and expected != net.fingerprint and not force:
            raise CheckpointError(
                f"adapter {adapter.path} was trained on base {adapter.base_model!r} (fingerprint {expected}), "
                f"but {base!r} has fingerprint {net.fingerprint}; pass --force to use it anyway")
        apply_adapter(net, adapter)
    net.eval()
    return net, adapter
