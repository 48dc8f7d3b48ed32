"""llama.cpp's GGUF files: GPT-2 with the adapter folded in, the base alone, or the adapter alone.

Tensor names come from `layout.MODULES` (its `gguf` column); our Linear holds (out, in), which is
GGUF's row-major layout, so no weight is transposed. Metadata and tensor types follow llama.cpp's
own converter (`convert_hf_to_gguf.py` for GPT-2, `convert_lora_to_gguf.py` for adapters), so
llama.cpp reads the files as it reads its own.

llama.cpp's GPT-2 uses the token embedding as the output layer when the file holds no
`output.weight`, and then applies a token-embedding LoRA to the output product too (the two share
one tensor name there). So a base written for a LoRA on the token embedding or on lm_head always
carries its own `output.weight`: `needs_own_output`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import layout
from ..adapters import lora as lora_layers
from ..adapters import variants
from ..atomic import atomic_path
from ..config import ACTIVATIONS, ModelConfig
from ..model.gpt2 import GPT2
from ..tokenizer import ASSETS, EOT_ID
from .merged import merged_parameters

# what this exporter writes, and llama.cpp's file-type number for each (LlamaFileType)
GGUF_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
GPT2_VOCAB = EOT_ID + 1
WRITTEN_BY_KEY = "lora_gpt2.written_by"


def require_gguf() -> Any:
    """The gguf package (published from llama.cpp's repository), or the line saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install 'lora-gpt2[gguf]'") from None
    return gguf


def check_type(name: str) -> None:
    if name not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {name!r} is not one this exporter writes for llama.cpp's GPT-2; "
                         f"choose one of {', '.join(GGUF_TYPES)}")


def check_model(config: ModelConfig) -> None:
    """Refuse a GPT-2 that llama.cpp would run with other arithmetic or another tokenizer."""
    if ACTIVATIONS[config.activation] != "tanh":
        raise ValueError(f"activation {config.activation!r} cannot be exported to GGUF: llama.cpp's GPT-2 "
                         "computes the tanh GELU (gelu_new) only")
    if config.vocab_size < GPT2_VOCAB:
        raise ValueError(f"vocab_size {config.vocab_size} cannot be exported to GGUF: the GPT-2 tokenizer "
                         f"written into the file has {GPT2_VOCAB} tokens")


def needs_own_output(model: GPT2) -> bool:
    """Whether the base written for this model's LoRA GGUF must hold lm_head as its own tensor."""
    return model.tied and any(isinstance(m, lora_layers.AdapterLayer) for m in (model.token_embedding, model.lm_head))


@dataclass
class Written:
    path: Path
    tensors: int = 0
    bytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> how many tensors have it


@dataclass
class _File:
    """A GGUF file being written: its writer, the gguf module, and what went into it."""

    writer: Any
    gguf: Any
    wanted: Any
    written: Written

    def add(self, name: str, tensor: torch.Tensor) -> None:
        qtype = _add(self.writer, self.gguf, name, tensor, self.wanted)
        self.written.types[qtype] = self.written.types.get(qtype, 0) + 1
        self.written.tensors += 1


@contextlib.contextmanager
def _gguf_file(out: Path, gguf_type: str, kind: str, name: str) -> Iterator[_File]:
    """A GGUF file on a temporary beside `out`, tensors packed as `gguf_type` asks; it replaces
    `out`, whole, when the block ends without error (and `written.bytes` is then its size)."""
    gguf = require_gguf()
    check_type(gguf_type)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_type(kind)
        writer.add_name(name)
        writer.add_string(WRITTEN_BY_KEY, "lora-gpt2")
        file = _File(writer, gguf, gguf.GGMLQuantizationType[gguf_type.upper()], Written(out))
        yield file
        file.written.bytes = _finish(writer)


def write_model(model: GPT2, out: Path, gguf_type: str, *, merged: bool = True,
                own_output: bool = False, name: str = "", chat_template: str | None = None) -> Written:
    """Write the model as one GGUF file: with the adapter folded in (`merged`), or its base alone.

    `own_output` writes lm_head as `output.weight` even when it is tied to the token embedding;
    `chat_template` (a chat-trained adapter's) goes in as `tokenizer.chat_template`, which
    llama.cpp's server renders conversations with (`--jinja`).
    """
    check_model(model.config)
    config = model.config
    with merged_parameters(model) if merged else _frozen_parameters(model) as (params, tied):
        with _gguf_file(out, gguf_type, "model", name or "GPT-2") as file:
            writer, gguf = file.writer, file.gguf
            writer.add_context_length(config.n_positions)
            writer.add_embedding_length(config.n_embd)
            writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
            writer.add_block_count(config.n_layer)
            writer.add_head_count(config.n_head)
            writer.add_layer_norm_eps(config.layer_norm_epsilon)
            writer.add_file_type(GGUF_TYPES[gguf_type])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_tokenizer(writer, gguf, config.vocab_size)
            if chat_template is not None:
                writer.add_chat_template(chat_template)
            for module in layout.MODULES:
                if module.ours == "lm_head" and tied and not own_output:
                    continue  # llama.cpp reads a missing output.weight as the token embedding
                for ours, theirs in layout.gguf_paths(module, config.n_layer):
                    for tensor in module.tensors:
                        file.add(f"{theirs}.{tensor}", params[f"{ours}.{tensor}"])
    return file.written


def write_lora(model: GPT2, out: Path, gguf_type: str, *, name: str = "") -> Written:
    """Write the model's adapter alone in llama.cpp's LoRA GGUF format (`--lora FILE`)."""
    check_type(gguf_type)
    check_model(model.config)
    pairs = list(_lora_pairs(model))
    if not pairs:
        raise ValueError("the model carries no adapter to write as a LoRA GGUF")
    scalings = {scaling for *_, scaling in pairs}
    ranks = {b.shape[1] for _, _, b, _ in pairs}
    if len(scalings) != 1 or len(ranks) != 1:
        raise ValueError("llama.cpp's LoRA GGUF holds one alpha / r for the whole adapter; "
                         "this adapter has several: export it merged with --format gguf")
    with _gguf_file(out, gguf_type, "adapter", name or "GPT-2 LoRA") as file:
        file.writer.add_string(file.gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / rank, with rank read off lora_b: alpha carries our scaling
        file.writer.add_float32(file.gguf.Keys.Adapter.LORA_ALPHA, scalings.pop() * ranks.pop())
        for theirs, a, b, _ in pairs:
            file.add(f"{theirs}.weight.lora_a", a)
            file.add(f"{theirs}.weight.lora_b", b)
    return file.written


def _lora_pairs(model: GPT2):
    """(GGUF module name, A, B, scaling) per adapted module, in llama.cpp's orientation."""
    variant = variants.variant(model.lora_config.variant if model.lora_config else "lora")
    if variant.gguf_lora is not None:
        raise ValueError(f"a {variant.name} adapter cannot be written as a LoRA GGUF: {variant.gguf_lora}")
    for module in layout.MODULES:
        if module.target is None:
            continue
        for ours, theirs in layout.gguf_paths(module, model.config.n_layer):
            layer = model.get_submodule(ours)
            if not isinstance(layer, lora_layers.AdapterLayer):
                continue
            if module.ours == "position_embedding":
                raise ValueError("an adapter on position_embedding cannot be written as a LoRA GGUF: llama.cpp "
                                 "applies no LoRA to the position embedding; export it merged with --format gguf")
            params = layer.adapter_params()
            a, b = params["lora_a"].detach(), params["lora_b"].detach()
            if module.kind == "embedding":
                a = a.T  # llama.cpp gathers rows of A by token id: (num, r) there, (r, num) here
            yield theirs, a, b, float(layer.scaling)


def _frozen_parameters(model: GPT2):
    """`merged_parameters`' shape for the base alone: the frozen tensors, adapters left out."""
    params = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    return contextlib.nullcontext((params, model.tied))


def _add(writer, gguf, name: str, tensor: torch.Tensor, wanted) -> str:
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    qtype = wanted
    # as llama.cpp's converter: 1-D tensors, norms and the position embedding stay float32
    if data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        # q8_0 packs rows in blocks of 32; a shorter row is written f16, as llama.cpp's converter does
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, packed, raw_dtype=qtype)
    return qtype.name


def _add_tokenizer(writer, gguf, vocab_size: int) -> None:
    """GPT-2's byte-level BPE as llama.cpp's converter writes it (tokenizer.ggml.*)."""
    encoder = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for token, i in encoder.items():
        tokens[i] = token
    types = [gguf.TokenType.NORMAL] * GPT2_VOCAB + [gguf.TokenType.UNUSED] * (vocab_size - GPT2_VOCAB)
    types[EOT_ID] = gguf.TokenType.CONTROL
    merges = [line for line in (ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(False)  # GPT-2 prompts start as written, as lora-gpt2 tokenizes them


def _finish(writer) -> int:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    size = writer.fout[0].tell()
    writer.close()
    return size
