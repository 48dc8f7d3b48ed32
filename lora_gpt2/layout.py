"""GPT-2's modules under our names and Hugging Face's: the one table every conversion derives from.

The LoRA target names (`--targets`), the HF checkpoint key map (checkpoints/hf.py and merged.py),
the PEFT module names (checkpoints/peft.py) and llama.cpp's GGUF tensor names
(checkpoints/gguf_file.py) are all read off `MODULES`; nothing else spells a module path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Module:
    """One module of GPT-2: our path, HF's path (`{i}` for the block index) and its kind."""

    ours: str  # "blocks.{i}.attn.qkv_projection"
    hf: str  # "transformer.h.{i}.attn.c_attn"
    kind: str  # "embedding", "conv1d" (HF stores (in, out)), "linear" or "norm"
    tensors: tuple[str, ...] = ("weight", "bias")
    gguf: str = ""  # llama.cpp's name: "blk.{i}.attn_qkv" (GGUF tensors are "<name>.weight")

    @property
    def target(self) -> str | None:
        """The LoRA target name (the last part of our path), or None for a layer norm."""
        return None if self.kind == "norm" else self.ours.rsplit(".", 1)[-1]

    @property
    def per_block(self) -> bool:
        return "{i}" in self.ours

    @property
    def peft_target(self) -> str:
        """PEFT's `target_modules` entry: a suffix that matches this module and no other."""
        return self.hf.removeprefix("transformer.").replace("h.{i}.", "")


MODULES = (
    Module("token_embedding", "transformer.wte", "embedding", ("weight",), gguf="token_embd"),
    Module("position_embedding", "transformer.wpe", "embedding", ("weight",), gguf="position_embd"),
    Module("blocks.{i}.attn_norm", "transformer.h.{i}.ln_1", "norm", gguf="blk.{i}.attn_norm"),
    Module("blocks.{i}.attn.qkv_projection", "transformer.h.{i}.attn.c_attn", "conv1d", gguf="blk.{i}.attn_qkv"),
    Module("blocks.{i}.attn.output_projection", "transformer.h.{i}.attn.c_proj", "conv1d", gguf="blk.{i}.attn_output"),
    Module("blocks.{i}.ffn_norm", "transformer.h.{i}.ln_2", "norm", gguf="blk.{i}.ffn_norm"),
    Module("blocks.{i}.ffn.linear_in", "transformer.h.{i}.mlp.c_fc", "conv1d", gguf="blk.{i}.ffn_up"),
    Module("blocks.{i}.ffn.linear_out", "transformer.h.{i}.mlp.c_proj", "conv1d", gguf="blk.{i}.ffn_down"),
    Module("final_norm", "transformer.ln_f", "norm", gguf="output_norm"),
    Module("lm_head", "lm_head", "linear", ("weight",), gguf="output"),  # tied to wte unless the config says not
)

# Target names in model order: what `--targets` accepts (besides the groups below).
TARGETS = tuple(m.target for m in MODULES if m.target)
BY_TARGET = {m.target: m for m in MODULES if m.target}
TARGET_GROUPS = {
    "attn": ("qkv_projection", "output_projection"),
    "ffn": ("linear_in", "linear_out"),
    "embeddings": ("token_embedding", "position_embedding"),
    "all": TARGETS,
}


def module_paths(module: Module, n_layer: int) -> list[tuple[str, str]]:
    """(our path, HF path) of every instance of `module` in a model of `n_layer` blocks."""
    if not module.per_block:
        return [(module.ours, module.hf)]
    return [(module.ours.format(i=i), module.hf.format(i=i)) for i in range(n_layer)]


def gguf_paths(module: Module, n_layer: int) -> list[tuple[str, str]]:
    """(our path, llama.cpp's GGUF name) of every instance of `module`."""
    if not module.per_block:
        return [(module.ours, module.gguf)]
    return [(module.ours.format(i=i), module.gguf.format(i=i)) for i in range(n_layer)]
