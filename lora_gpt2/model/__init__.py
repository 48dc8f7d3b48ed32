"""GPT-2 written from the adapter layers (gpt2.py: attention, blocks, the KV cache) and its fused
lm_head loss (loss.py), which never materialises the full logits."""

from .gpt2 import GPT2, BaseModel, KVCache, LayerKV
from .loss import fused_lm_head_loss

__all__ = ["GPT2", "BaseModel", "KVCache", "LayerKV", "fused_lm_head_loss"]
