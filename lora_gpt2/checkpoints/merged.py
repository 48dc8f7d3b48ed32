"""Write base + adapter as a plain Hugging Face GPT-2 folder (config.json + model.safetensors).

The LoRA updates are folded into the weights. GPT-2 ties lm_head to the token embedding;
when the adapter changes either of them the two differ after merging, so lm_head is written
on its own and `tie_word_embeddings` is set to false.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from ..atomic import write_bytes, write_text
from ..errors import CheckpointError
from ..model.gpt2 import GPT2
from ..tokenizer import ASSETS, EOT_TOKEN
from .hf import LM_HEAD, hf_key_map, is_transposed
from .outputs import WRITTEN_BY


@contextlib.contextmanager
def merged_parameters(model: GPT2) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """(every parameter by our name with the updates folded in, whether lm_head stays tied),
    valid inside the block. The model is merged for it and unmerged after: the caller's model
    is unchanged."""
    model.merge()
    try:
        params = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
        yield params, model.tied  # merge unties the pair when either half carries an update
    finally:
        model.unmerge()


def merged_state_dict(model: GPT2) -> tuple[dict[str, torch.Tensor], bool]:
    """(HF state dict with the updates folded in, whether lm_head stays tied)."""
    with merged_parameters(model) as (params, tied):
        state = {}
        for ours, theirs in hf_key_map(model.config.n_layer).items():
            tensor = params[ours]
            # HF Conv1D stores (in, out); our Linear holds (out, in)
            state[f"transformer.{theirs}"] = (tensor.T if is_transposed(theirs) else tensor).contiguous().clone()
        if not tied:
            state[LM_HEAD] = params["lm_head.weight"].contiguous().clone()
        return state, tied


def write_tokenizer(out_dir: Path, context: int, template=None) -> None:
    """GPT-2's tokenizer under the names transformers looks for, and a chat-trained adapter's
    template as the tokenizer's `chat_template`, so `apply_chat_template` renders as training did."""
    shutil.copyfile(ASSETS / "encoder.json", out_dir / "vocab.json")
    shutil.copyfile(ASSETS / "vocab.bpe", out_dir / "merges.txt")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN,
              "unk_token": EOT_TOKEN, "add_prefix_space": False, "model_max_length": context}
    if template is not None:
        config["chat_template"] = template.text
    write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def write_merged(model: GPT2, out_dir: Path, template=None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into `out_dir`."""
    from safetensors.torch import save

    if model.base is None:
        raise CheckpointError("the model has no base checkpoint to take config.json from; "
                              "load it with load_pretrained")
    state, tied = merged_state_dict(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(model.base.hf_config)
    config["tie_word_embeddings"] = tied
    config["architectures"] = ["GPT2LMHeadModel"]
    write_bytes(out_dir / "model.safetensors", save(state, metadata={"format": "pt", **WRITTEN_BY}))
    write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    write_tokenizer(out_dir, model.config.n_positions, template)  # so the folder is complete
    return out_dir
