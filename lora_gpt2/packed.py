"""A decode-time layout for frozen linear weights: oneDNN's blocked ("packed") copy.

Decoding multiplies a few rows by each weight. PyTorch's general matmul repacks the weight on
every call for that, which costs more than the product itself: measured on a 2-core AMD EPYC
(AVX2), GPT-2 small's lm_head with 4 rows took 29 ms through `F.linear` and 7.3 ms packed, and
one row 11.4 vs 5.9 ms. Packing is done once, when a generation session starts; training and
evaluation never use it (they run with gradients, or without a session).

Where oneDNN cannot pack (another device, a dtype this CPU cannot pack, a build without it)
nothing changes: `pack` returns None and the layer keeps `F.linear`.
"""

from __future__ import annotations

import torch


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's layout of a (out, in) weight for products with any number of rows, or None."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
    except RuntimeError:  # e.g. bfloat16 on a CPU without AVX-512 or AVX-NE-CONVERT
        return None


def usable(packed: torch.Tensor | None, x: torch.Tensor) -> bool:
    return (packed is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == packed.dtype)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight's packed copy."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
