"""lora-gpt2: fine-tune GPT-2 with LoRA from the command line.

`import lora_gpt2` stays light: torch is imported on first use of `load_pretrained`.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_pretrained"]


def __getattr__(name: str):
    if name == "load_pretrained":
        from .checkpoints.hf import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lora_gpt2' has no attribute {name!r}")
