"""int8 weight-only decoding (`--quantize int8`): each linear weight kept as int8 with one float
scale per output channel, multiplied by PyTorch's own int8 weight-only kernel.

W ≈ s·Q with Q = round(W / s) in [-127, 127] and s = max|W_row| / 127, per output row (symmetric:
no zero point, so an all-zero row stays exactly zero). The kernel (`torch._weight_int8pack_mm`)
reads the int8 weight directly and takes bfloat16 activations: measured on a 2-core AMD EPYC
with AVX2 only, it runs 5x faster with bf16 activations than with float32 ones, so activations
are rounded to bf16 at each product's input (the residual stream, norms, attention and softmax
stay in the model's dtype) and its bf16 output is widened back before the float32 scale. The
kernel's cost grows with the rows (one pass per row over the weight): beyond INT8_ROWS rows (a
prompt's prefill, an evaluation batch) the weight is dequantized for that call and multiplied
in the model's dtype, which is bound by compute there, not by reading the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Measured (GPT-2 small's 48 block products, AVX2): the kernel costs 17.7 ms at 1 row, 34.6 at 8,
# 126.5 at 32; a dequantized product costs 120-210 ms at 8-32 rows, mostly the dequantization.
INT8_ROWS = 48
# The kernel reads the input in runs of 16 with no tail: measured on PyTorch 2.13 (AVX2), an input
# width of 5 or 33 gave wrong sums or a crash, every multiple of 16 the exact ones. GPT-2's widths
# all are; another width is dequantized instead, so its layer is still int8, only slower.
KERNEL_K = 16
# Rows quantised at a time: the float temporaries of a whole weight would be three times its size
# (about 460 MB at once for GPT-2 small's 154 MB lm_head), those of 1024 rows are a few MB.
QUANTIZE_ROWS = 1024


@dataclass(frozen=True)
class Int8Weight:
    """A (out, in) weight as int8 values and a float32 scale per output row."""

    values: torch.Tensor  # (out, in) int8, contiguous
    scale: torch.Tensor  # (out,) float32
    ones: torch.Tensor  # (out,) bf16 ones: the kernel's own scale, so the float32 one is exact

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int8Weight":
        values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.size(0), dtype=torch.float32, device=weight.device)
        for first in range(0, weight.size(0), QUANTIZE_ROWS):  # float temporaries of a slice only
            rows = slice(first, first + QUANTIZE_ROWS)
            w = weight[rows].detach().float()
            s = w.abs().amax(dim=1) / 127
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: Q = 0
            values[rows], scale[rows] = torch.round(w / s[:, None]).clamp_(-127, 127), s
        return cls(values, scale, torch.ones_like(scale, dtype=torch.bfloat16))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.values.float() * self.scale[:, None]).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes + self.ones.nbytes


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x · (s·Q)ᵀ + b, in x's dtype."""
    flat = x.reshape(-1, x.size(-1))
    if flat.size(0) <= INT8_ROWS and flat.size(1) % KERNEL_K == 0:
        out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), w.values, w.ones).to(x.dtype)
        scale = w.scale.to(x.dtype)  # a bf16 model's residual stream stays bf16
        out = out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale)
    else:
        out = F.linear(flat, w.dequantized(x.dtype), bias)
    return out.reshape(*x.shape[:-1], out.size(-1))


class Int8:
    """The int8 format for DecodeLayout. Folding an adapter's update before quantising was the
    closer of the two to float32 decoding (the README's int8 section has both measured)."""

    name = "int8"
    folds = True

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse, in one line, where PyTorch has no int8 weight-only kernel for this device."""
        kernel = getattr(torch, "_weight_int8pack_mm", None)
        if kernel is None:
            raise ValueError(f"--quantize int8 needs torch._weight_int8pack_mm, which PyTorch {torch.__version__} "
                             "lacks")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"--quantize int8 decodes float32 or bfloat16 models, got {str(dtype).split('.')[-1]}")
        try:
            probe = Int8Weight.of(torch.ones(8, 32, device=device))
            kernel(torch.ones(1, 32, dtype=torch.bfloat16, device=device), probe.values, probe.ones)
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(f"--quantize int8: PyTorch's int8 weight-only kernel does not run on {device.type} "
                             f"({str(err).splitlines()[0][:120]})") from None

    def pack(self, weight: torch.Tensor) -> Int8Weight:
        return Int8Weight.of(weight)

    def linear(self, x: torch.Tensor, packed: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor | None:
        if x.device != packed.values.device:
            return None
        return int8_linear(x, packed, bias)
