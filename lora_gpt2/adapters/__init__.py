"""Adapter layers and their variants: the frozen layers GPT-2 is built from, the LoRA layers
(lora.py, the spec), DoRA (dora.py), and the functions every consumer asks instead of matching
names (`lora_parameters`, `fast_parameters`, `mark_only_lora_trainable`, `count_parameters`)."""

from .dora import DoRAEmbedding, DoRALinear
from .lora import (AdapterLayer, Embedding, FrozenEmbedding, FrozenLinear, Linear, LowRankTerms, adapter_layers,
                   count_parameters, fast_parameters, lora_parameters, mark_only_lora_trainable)

__all__ = ["AdapterLayer", "Linear", "Embedding", "FrozenLinear", "FrozenEmbedding", "DoRALinear", "DoRAEmbedding",
           "LowRankTerms", "adapter_layers", "lora_parameters", "fast_parameters", "mark_only_lora_trainable",
           "count_parameters"]
