"""The table of adapter variants and initialisations: everything a consumer asks of one.

A *variant* is the maths of the layer (plain LoRA, DoRA); an *init* is how its tensors start
(the seed's kaiming/zeros, PiSSA, OLoRA). The model asks this table which class to build, the
PEFT reader and writer ask it for config keys and tensor names, the adapter bank asks whether it
can add a variant per row, and the checkpoint writer asks it what an adapter is saved as. Adding
one is one file (its layer class or its decomposition) plus one row here; nothing else names it.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .. import layout
from ..config import LoRAConfig

# PEFT's tensor suffix for each (layer kind, our local tensor name) every LoRA layer has
LOW_RANK_TENSORS = {
    ("linear", "lora_a"): "lora_A.weight",
    ("linear", "lora_b"): "lora_B.weight",
    ("embedding", "lora_a"): "lora_embedding_A",
    ("embedding", "lora_b"): "lora_embedding_B",
}


@dataclass(frozen=True)
class Variant:
    """One kind of adapter layer and what consumers ask of it."""

    name: str
    linear: str  # "module.Class" in this package: the layer class of a linear target
    embedding: str  # ... of an embedding target (named, so reading the table needs no torch)
    help: str
    peft: dict[str, Any] = field(default_factory=dict)  # adapter_config.json keys saying this variant
    tensors: dict[tuple[str, str], str] = field(default_factory=dict)  # PEFT suffixes beyond A and B
    unbatchable: str | None = None  # why the adapter bank cannot add it per row (None: it can)
    residual_inits: bool = True  # whether PiSSA / OLoRA may start it
    gguf_lora: str | None = None  # why llama.cpp's LoRA GGUF cannot hold it (None: it can)


@dataclass(frozen=True)
class Init:
    """One way to start the low-rank tensors. `decompose` names a function (weight (out, in)
    float32, r, scaling, **options) -> (A0, B0) that takes the first update out of the frozen
    weight, which then trains as a residual (residual.py); None is the seed's init
    (kaiming-uniform A, zero B), which leaves the weight alone."""

    name: str
    help: str
    decompose: str | None = None  # "module.function" in this package
    peft_value: Any = True  # PEFT's init_lora_weights for it
    options: dict[str, Any] = field(default_factory=dict)


VARIANTS = {v.name: v for v in (
    Variant("lora", "lora.Linear", "lora.Embedding", "plain LoRA: weight + (alpha / r) B A",
            peft={"use_dora": False}),
    Variant("dora", "dora.DoRALinear", "dora.DoRAEmbedding",
            "DoRA: a trained magnitude per output feature times the direction of weight + LoRA update",
            peft={"use_dora": True},
            tensors={("linear", "magnitude"): "lora_magnitude_vector",
                     ("embedding", "magnitude"): "lora_magnitude_vector"},
            unbatchable="its magnitude rescales whole outputs, so it cannot share a batch unmerged; "
                        "merge it into its own model instead",
            residual_inits=False,
            gguf_lora="llama.cpp's LoRA GGUF holds A and B only, not DoRA's magnitude; "
                      "export it merged with --format gguf"),
)}

INITS = {i.name: i for i in (
    Init("default", "kaiming-uniform lora_a, zero lora_b (the seed's; the weight is untouched)"),
    Init("pissa", "PiSSA: A and B from the weight's top-r singular vectors; the weight trains as the rest",
         "pissa.decompose", "pissa"),
    Init("olora", "OLoRA: A and B from the weight's QR factors; the weight trains as the rest",
         "olora.decompose", "olora"),
)}
# PEFT's "pissa_niter_N": PiSSA through N iterations of randomised SVD instead of a full SVD
_NITER = re.compile(r"^pissa_niter_([1-9][0-9]{0,3})$")

TENSOR_SUFFIXES = {**LOW_RANK_TENSORS, **{k: s for v in VARIANTS.values() for k, s in v.tensors.items()}}


def describe(table: dict) -> str:
    """'name (what it is); ...' for a table's rows: the --help text of its setting."""
    return "; ".join(f"{row.name} ({row.help})" for row in table.values())


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def init(name: str) -> Init:
    if name in INITS:
        return INITS[name]
    match = _NITER.match(str(name))
    if match:
        niter = int(match.group(1))
        return replace(INITS["pissa"], name=name, help=f"PiSSA by {niter} iterations of randomised SVD",
                       peft_value=name, options={"niter": niter})
    raise ValueError(f"unknown LoRA init {name!r}; choose one of {', '.join(INITS)} or pissa_niter_N")


def check(cfg: LoRAConfig) -> None:
    """Refuse a variant or init that does not exist, or a pair that cannot be combined, by name."""
    v, start = variant(cfg.variant), init(cfg.init)
    if start.decompose is not None and not v.residual_inits:
        raise ValueError(f"init {cfg.init} cannot start a {v.name} adapter: a {v.name} adapter has no "
                         "plain-LoRA form to save it as; use --init default")
    if start.decompose is not None:
        embeddings = [t for t in cfg.targets if layout.BY_TARGET[t].kind == "embedding"]
        if embeddings:
            raise ValueError(f"init {cfg.init} decomposes linear weights only (as PEFT's), but the targets "
                             f"include the embedding {embeddings[0]}; use --init default for embeddings")


def _named(where: str):
    module, name = where.rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __package__), name)


def linear(cfg: LoRAConfig, n_in: int, n_out: int, bias: bool):
    """The adapter layer of a linear target under `cfg`."""
    check(cfg)
    start = init(cfg.init)
    kwargs = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora)
    if start.decompose is not None:
        decompose = functools.partial(_named(start.decompose), **start.options)
        return _named("residual.ResidualLinear")(n_in, n_out, bias, decompose=decompose, **kwargs)
    return _named(variant(cfg.variant).linear)(n_in, n_out, bias, **kwargs)


def embedding(cfg: LoRAConfig, num: int, dim: int):
    """The adapter layer of an embedding target under `cfg`."""
    check(cfg)
    return _named(variant(cfg.variant).embedding)(num, dim, r=cfg.r, alpha=cfg.alpha, rslora=cfg.rslora)


def saved_config(cfg: LoRAConfig) -> LoRAConfig:
    """What an adapter trained with `cfg` is saved as. A residual init is saved as PEFT's
    `path_initial_model_for_weight_conversion` saves it: B A - B0 A0, a plain LoRA update of rank
    2r on the *original* weights, with alpha scaled so that the scaling stays the same."""
    if init(cfg.init).decompose is None:
        return cfg
    alpha = cfg.alpha_value * (math.sqrt(2) if cfg.rslora else 2)
    return replace(cfg, r=2 * cfg.r, alpha=alpha, init="default")


def peft_keys(cfg: LoRAConfig) -> dict[str, Any]:
    """adapter_config.json keys that say which variant and init an adapter is."""
    return {**variant(cfg.variant).peft, "init_lora_weights": init(cfg.init).peft_value}


def from_peft(raw: dict[str, Any]) -> tuple[str, str]:
    """(variant, init) named by a PEFT adapter_config.json: the variant whose keys all say it
    (plain LoRA when none does). Tensors saved from a residual init are refused: they apply to
    the weights that init left, which no reader has."""
    chosen = "lora"
    for v in VARIANTS.values():
        if any(v.peft.values()) and all(bool(raw.get(k)) == bool(want) for k, want in v.peft.items()):
            chosen = v.name
    value = raw.get("init_lora_weights", True)
    residual = {i.peft_value for i in INITS.values() if i.decompose is not None} | {"corda", "loftq"}
    if isinstance(value, str) and (value in residual or _NITER.match(value)):
        raise ValueError(f"init_lora_weights={value!r}: its tensors apply to the residual weights that "
                         "initialisation leaves, not to the base model; save it from PEFT with "
                         "path_initial_model_for_weight_conversion")
    return chosen, "default"


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """Settings written before variants had names (lora-gpt2 0.2: `"dora": true`) in today's words."""
    if "dora" not in values:
        return values
    values = dict(values)
    old = values.pop("dora")
    if isinstance(old, bool) and "variant" not in values:
        values["variant"] = "dora" if old else "lora"
    return values
