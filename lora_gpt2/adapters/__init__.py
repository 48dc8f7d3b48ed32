"""Adapter layers and their variants: the frozen layers GPT-2 is built from, the LoRA layers
(lora.py, the spec), DoRA (dora.py), residual inits (residual.py with pissa.py, olora.py), the
table naming them all (variants.py), and the functions every consumer asks instead of matching
names (`lora_parameters`, `saved_tensors`, `start_adapters`, `fast_parameters`, ...).

Add a variant or an init by writing its file and one row in variants.py. The names below load
their module on first use, so the CLI reads the table without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    **{name: "lora" for name in ("AdapterLayer", "Linear", "Embedding", "FrozenLinear", "FrozenEmbedding",
                                 "LowRankTerms", "adapter_layers", "lora_parameters", "saved_tensors",
                                 "start_adapters", "fast_parameters", "mark_only_lora_trainable",
                                 "count_parameters")},
    "DoRALinear": "dora", "DoRAEmbedding": "dora", "ResidualLinear": "residual",
}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from .dora import DoRAEmbedding, DoRALinear
    from .lora import (AdapterLayer, Embedding, FrozenEmbedding, FrozenLinear, Linear, LowRankTerms, adapter_layers,
                       count_parameters, fast_parameters, lora_parameters, mark_only_lora_trainable, saved_tensors,
                       start_adapters)
    from .residual import ResidualLinear


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
