"""GPT-2 written from LoRA layers (adapters/lora.py) and LayerNorm.

Module names are the reference design's LoRA target names; checkpoints/hf.py maps them to
Hugging Face's checkpoint keys. The frozen weights may be stored in float32, bfloat16
or float16; LoRA parameters stay float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..adapters import lora, variants
from ..config import ACTIVATIONS, LoRAConfig, ModelConfig
from .loss import fused_lm_head_loss


def _check_rank(name: str, rows: int, cols: int, cfg: LoRAConfig) -> None:
    # B @ A has rank at most min(rows, cols): a larger r only costs memory (and r = 10^8 would
    # try to allocate it before anything else could say why)
    if cfg.r > min(rows, cols):
        raise ValueError(f"rank r={cfg.r} is more than {name} can use: its weight is {rows} x {cols}, "
                         f"so its full rank is {min(rows, cols)}; choose a rank of at most {min(rows, cols)}")


def _linear(name: str, n_in: int, n_out: int, bias: bool, cfg: LoRAConfig, adapted: bool = True) -> nn.Module:
    if name in cfg.targets and adapted:
        _check_rank(name, n_out, n_in, variants.saved_config(cfg))  # what it is saved as must fit too
        return variants.linear(cfg, n_in, n_out, bias)
    return lora.FrozenLinear(n_in, n_out, bias)


def _embedding(name: str, num: int, dim: int, cfg: LoRAConfig) -> nn.Module:
    if name in cfg.targets:
        _check_rank(name, num, dim, cfg)
        return variants.embedding(cfg, num, dim)
    return lora.FrozenEmbedding(num, dim)


@dataclass(frozen=True)
class BaseModel:
    """Which pretrained weights a model holds: declared once by the loader, read by every writer."""

    source: str  # what the user named: a Hub id or a directory
    directory: Path  # where config.json and the weights were read
    fingerprint: str  # of the weights (see weights.load_into)
    hf_config: dict[str, Any] = field(default_factory=dict)  # config.json as read, for merged copies


class LayerCache(Protocol):
    """What one layer's attention reads and writes its keys and values through: the contiguous
    `LayerKV` below, or a decoding batch's per-row caches (inference/kv.py)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, nh, T, hs) and return the attention (B, nh, T, hs) of q over everything cached."""


class StepCache(Protocol):
    """A decoding step's caches: one new token per row, each row at its own position (requests
    that started at different times). `advance` counts the token in after the forward."""

    positions: torch.Tensor  # (B, 1)

    def layer(self, i: int) -> LayerCache: ...

    def advance(self) -> None: ...


@dataclass
class LayerKV:
    """One layer's slice of a KVCache: where its keys and values go, from position `start`."""

    keys: torch.Tensor  # (B, nh, T_max, hs)
    values: torch.Tensor
    start: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, T = self.start, q.size(2)
        self.keys[:, :, start : start + T] = k
        self.values[:, :, start : start + T] = v
        k = self.keys[:, :, : start + T]  # (B, nh, start+T, hs)
        v = self.values[:, :, : start + T]
        if T == 1:  # one new token attends to everything cached: no mask needed
            return F.scaled_dot_product_attention(q, k, v)
        # new query i sits at position start + i and sees keys j <= start + i
        visible = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


@dataclass
class KVCache:
    """Keys and values of every layer for positions [0, length): (B, nh, T_max, hs) each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, dtype: torch.dtype, device,
              positions: int | None = None) -> "KVCache":
        """Room for `positions` (at most, and by default, the model's context) in each of `batch` rows."""
        positions = config.n_positions if positions is None else min(positions, config.n_positions)
        shape = (batch, config.n_head, positions, config.head_size)
        make = lambda: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        return cls([make() for _ in range(config.n_layer)], [make() for _ in range(config.n_layer)])

    @property
    def room(self) -> int:
        return self.keys[0].size(2)

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.keys[i], self.values[i], self.length)


def _segment_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at each example, and the block-diagonal causal mask
    (B, 1, T, T) of packed rows."""
    B, T = segments.shape
    steps = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]  # an example's first position
    starts = torch.where(first, steps, torch.zeros_like(steps)).cummax(dim=1).values  # (B, T)
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return steps - starts, (same & causal).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, lora_cfg: LoRAConfig, adapted: bool = True) -> None:
        super().__init__()
        self.n_head = config.n_head
        d = config.n_embd
        self.qkv_projection = _linear("qkv_projection", d, 3 * d, True, lora_cfg, adapted)
        self.output_projection = _linear("output_projection", d, d, True, lora_cfg, adapted)

    def forward(self, x: torch.Tensor, kv: LayerCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`kv`: where this layer's keys and values are cached (None: nothing is). `mask` (B, 1, T, T),
        True where a query may see a key: packed rows' block-diagonal causal attention; None is
        plain causal attention."""
        if kv is not None and not hasattr(kv, "attend"):
            raise TypeError(f"a layer takes its own slice of the cache (KVCache.layer(i)), got {type(kv).__name__}")
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qkv = self.qkv_projection(x)  # (B, T, 3C)
        # split, not permute + unbind: the same views, but unbind's backward is a stack (a copy)
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv is not None:
            y = kv.attend(q, k, v)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.output_projection(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, lora_cfg: LoRAConfig, adapted: bool = True) -> None:
        super().__init__()
        d, f = config.n_embd, config.ffn_size
        self.linear_in = _linear("linear_in", d, f, True, lora_cfg, adapted)
        self.linear_out = _linear("linear_out", f, d, True, lora_cfg, adapted)
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(F.gelu(self.linear_in(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, lora_cfg: LoRAConfig, adapted: bool = True) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, lora_cfg, adapted)
        self.ffn_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.ffn = FeedForward(config, lora_cfg, adapted)

    def forward(self, x: torch.Tensor, kv: LayerCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), kv, mask)
        return x + self.ffn(self.ffn_norm(x))


class GPT2(nn.Module):
    def __init__(self, config: ModelConfig, lora_config: LoRAConfig | None = None) -> None:
        super().__init__()
        lora_cfg = lora_config if lora_config is not None else LoRAConfig(targets=())
        self.config = config
        self.lora_config = lora_cfg
        self.token_embedding = _embedding("token_embedding", config.vocab_size, config.n_embd, lora_cfg)
        self.position_embedding = _embedding(
            "position_embedding", config.n_positions, config.n_embd, lora_cfg
        )
        adapted = lora_cfg.blocks(config.n_layer)  # --layers: per-block targets in these blocks only
        self.blocks = nn.ModuleList(Block(config, lora_cfg, i in adapted) for i in range(config.n_layer))
        self.final_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = _linear("lm_head", config.n_embd, config.vocab_size, False, lora_cfg)
        self.base: BaseModel | None = None  # set by weights.load_pretrained
        self._untied_by_merge = False
        self.grad_checkpoint = False  # training: keep only block inputs, recompute the rest in backward
        self.tie_weights()
        if self.tied and getattr(self.lm_head, "residual", False):
            raise ValueError(f"init {lora_cfg.init} would change lm_head's frozen weight, which this model ties "
                             "to token_embedding (the embedding would change too); use --init default for lm_head")
        lora.mark_only_lora_trainable(self)

    def tie_weights(self) -> None:
        """GPT-2 ties lm_head to the token embedding: one tensor, not a copy."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.token_embedding.weight

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | StepCache | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, C) for token ids idx (B, T).

        `segments` (B, T) marks packed rows: position p belongs to example segments[b, p], its
        positions count from 0 at the example's first token, and it sees only earlier positions
        of the same example, exactly as if the example were alone in the row.
        """
        B, T = idx.shape
        if cache is not None and not isinstance(cache, KVCache):  # rows at their own positions: one token each
            return self._rows_step(idx, cache)
        start = 0 if cache is None else cache.length
        if start + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context "
                f"of {self.config.n_positions}"
            )
        mask = None
        if segments is None:
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            pos, mask = _segment_positions(segments)  # (B, T), (B, 1, T, T)
        first = self.first_trained_block if torch.is_grad_enabled() else 0
        with torch.no_grad() if first else contextlib.nullcontext():
            # nothing below the lowest adapted block learns: backward need not reach it, so
            # its activations are not kept (an lm_head-only adapter runs every block this way)
            x = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
            for i, block in enumerate(self.blocks[:first]):
                x = block(x, None if cache is None else cache.layer(i), mask)
        recompute = self.grad_checkpoint and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks[first:], start=first):
            if recompute:  # the RNG state is replayed, so dropout draws the same masks again
                x = checkpoint(block, x, None, mask, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, None if cache is None else cache.layer(i), mask)
        if cache is not None:
            cache.length = start + T
        return self.final_norm(x)

    def _rows_step(self, idx: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """Hidden states (B, 1, C) for one new token per row, each row continuing its own cache at
        its own position: the batched decoding step of requests that started at different times."""
        if idx.size(1) != 1 or cache.positions.shape != (idx.size(0), 1):
            raise ValueError(f"a decoding step takes one token per row: got ids {tuple(idx.shape)} "
                             f"for positions {tuple(cache.positions.shape)}")
        x = self.token_embedding(idx) + self.position_embedding(cache.positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i))
        cache.advance()
        return self.final_norm(x)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | StepCache | None = None, targets: torch.Tensor | None = None,
        reduction: str = "mean", segments: torch.Tensor | None = None, at: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with targets (B, T), the loss instead:
        the mean over the counted targets (those >= 0; -1 marks padding or a masked prompt), or
        with reduction="sum" their sum. With `at` (a position, or one per row (B,)), the logits
        (B, vocab) at those positions only: decoding reads one position of a prompt, and the
        lm_head over a 1,000-token prompt would cost 77 GFLOP and 200 MB for nothing.

        The loss never materialises the full logits (see loss.py).
        """
        h = self.hidden_states(idx, cache, segments)
        if targets is not None:
            return fused_lm_head_loss(h, self.lm_head, targets, reduction=reduction)
        if at is None:
            return self.lm_head(h)
        rows = h[:, at] if isinstance(at, int) else h[torch.arange(h.size(0), device=h.device), at]  # (B, C)
        return self.lm_head(rows[:, None])[:, 0]  # (B, vocab)

    def lora_layers(self) -> dict[str, lora.AdapterLayer]:
        return lora.adapter_layers(self)

    @property
    def first_trained_block(self) -> int:
        """The lowest block that holds a trainable parameter, or that trainable embeddings feed
        (0); n_layer when only the lm_head learns."""
        if any(p.requires_grad for m in (self.token_embedding, self.position_embedding) for p in m.parameters()):
            return 0
        for i, block in enumerate(self.blocks):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return len(self.blocks)

    @property
    def fingerprint(self) -> str | None:
        return self.base.fingerprint if self.base else None

    def merge(self) -> None:
        """Fold every LoRA update into its frozen weight (explicit; idempotent).

        When the tied pair token_embedding / lm_head carries an update, lm_head gets its own
        copy of the weight first: folding both updates into one shared tensor would be wrong.
        `unmerge` ties them again, so merge + unmerge leaves the model as it was.
        """
        if self.tied and any(
            isinstance(m, lora.AdapterLayer) for m in (self.token_embedding, self.lm_head)
        ):
            self.lm_head.weight = nn.Parameter(
                self.token_embedding.weight.detach().clone(), requires_grad=False
            )
            self._untied_by_merge = True
        for layer in self.lora_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()
        if self._untied_by_merge:  # the copy made for merging goes; the pair is one tensor again
            self.lm_head.weight = self.token_embedding.weight
            self._untied_by_merge = False

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """The base model alone, for as long as the block runs (not allowed while merged)."""
        layers = list(self.lora_layers().values())
        if any(layer.merged for layer in layers):
            raise RuntimeError("unmerge the model before disabling its LoRA layers")
        for layer in layers:
            layer.active = False
        try:
            yield
        finally:
            for layer in layers:
                layer.active = True

    def frozen_dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype
