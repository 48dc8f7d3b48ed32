"""Model and LoRA configuration: frozen dataclasses that check themselves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .layout import TARGET_GROUPS, TARGETS

# Choices of `--dtype` / `--device` (resolved in devices.py, which needs torch).
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_targets(names: Iterable[str] | str) -> tuple[str, ...]:
    """Expand module and group names into module names, in model order.

    Accepts an iterable or a comma-separated string: "attn,lm_head".
    """
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n]
    chosen: set[str] = set()
    for name in names:
        if name in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[name])
        elif name in TARGETS:
            chosen.add(name)
        else:
            valid = ", ".join(TARGETS + tuple(TARGET_GROUPS))
            raise ValueError(f"unknown LoRA target {name!r}; valid targets: {valid}")
    return tuple(t for t in TARGETS if t in chosen)


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 hyperparameters, read from a checkpoint's config.json."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    activation: str = "gelu_new"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not (self.layer_norm_epsilon > 0 and math.isfinite(self.layer_norm_epsilon)):
            raise ValueError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_size(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner


# HF activation_function name -> torch GELU approximation. GPT-2 uses the tanh form.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def parse_layers(spec: str) -> tuple[str, tuple[int, ...]]:
    """A `--layers` value: "N" (the last N blocks), "A-B" (blocks A to B) or "A,B,C".
    Returns ("last", (N,)) or ("blocks", indices); the block count is checked later."""
    text = str(spec).replace(" ", "")
    try:
        if text.isdigit():
            if int(text) < 1:
                raise ValueError
            return "last", (int(text),)
        if "-" in text and "," not in text:
            low, high = (int(part) for part in text.split("-"))
            if low < 0 or high < low:
                raise ValueError
            return "blocks", tuple(range(low, high + 1))
        blocks = tuple(sorted({int(part) for part in text.split(",")}))
        if not blocks or blocks[0] < 0:
            raise ValueError
        return "blocks", blocks
    except ValueError:
        raise ValueError(f"layers must be N (the last N blocks, N >= 1), A-B with A <= B, or a list "
                         f"A,B,C of block numbers from 0; got {spec!r}") from None


@dataclass(frozen=True)
class LoRAConfig:
    """Which modules get a LoRA update, and its rank, alpha, dropout and variant.

    The one place these settings are checked: the layers, the training config and every
    reader of an adapter build a LoRAConfig. `alpha=None` means alpha = r (scaling 1).
    `rslora` makes scaling alpha / sqrt(r) (rank-stabilised LoRA). `variant` names the layers'
    maths and `init` how their tensors start, both rows of adapters/variants.py (which checks the
    names). `layers` limits the per-block targets to some blocks ("N": the last N; "A-B";
    "A,B,C"); None is every block. Embedding and lm_head targets do not depend on it.
    """

    targets: tuple[str, ...] = ("qkv_projection",)
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    layers: str | None = None
    variant: str = "lora"
    init: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", resolve_targets(self.targets))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not (math.isfinite(self.alpha) and self.alpha > 0)):
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora must be true or false, got {self.rslora!r}")
        for name in ("variant", "init"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a name, got {getattr(self, name)!r}")
        if self.layers is not None:
            parse_layers(self.layers)

    def blocks(self, n_layer: int) -> tuple[int, ...]:
        """The blocks whose per-block targets get an adapter, for a model of n_layer blocks."""
        if self.layers is None:
            return tuple(range(n_layer))
        how, values = parse_layers(self.layers)
        if how == "last":
            if values[0] > n_layer:
                raise ValueError(f"layers {self.layers!r} asks for the last {values[0]} blocks of a "
                                 f"{n_layer}-block model")
            return tuple(range(n_layer - values[0], n_layer))
        if values[-1] >= n_layer:
            raise ValueError(f"layers {self.layers!r} names block {values[-1]}, but the model's blocks are "
                             f"0-{n_layer - 1}")
        return values

    @property
    def alpha_value(self) -> float:
        """The alpha in force: `alpha`, or r when none was given."""
        return self.r if self.alpha is None else self.alpha

    @property
    def scaling(self) -> float:
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale as r grows
        return self.alpha_value / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "rslora": self.rslora, "layers": self.layers, "variant": self.variant, "init": self.init}

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        """The inverse of `to_dict` (KeyError without targets and r; absent optional keys default)."""
        optional = {k: values[k] for k in ("alpha", "dropout", "rslora", "layers", "variant", "init") if k in values}
        return cls(targets=tuple(values["targets"]), r=values["r"], **optional)
