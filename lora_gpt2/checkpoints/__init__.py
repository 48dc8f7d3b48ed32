"""Weights and adapters on disk: Hugging Face GPT-2 in (hub.py finds it, hf.py loads it), our
adapter folders (adapter_dir.py: atomic writes, consistent reads, training state), PEFT
folders both ways (peft.py), merged GPT-2 folders out (merged.py), where outputs may go
(outputs.py), and any adapter read and applied to its base (reading.py)."""

from .hf import load_pretrained
from .merged import write_merged
from .peft import export_peft, read_peft
from .reading import Adapter, load_with_adapter, read_adapter

__all__ = ["load_pretrained", "read_adapter", "load_with_adapter", "Adapter", "export_peft", "read_peft",
           "write_merged"]
