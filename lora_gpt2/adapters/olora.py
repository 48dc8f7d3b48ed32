"""OLoRA (Büyükakyüz 2024): the adapter starts from the weight's QR factors, as PEFT's
`init_lora_weights="olora"`: W = QR; B0 = Q_r, A0 = R_r, and the frozen weight trains as
W - s·B0A0 (residual.py).

The factors are of the weight as the layer computes with it, (out, in). PEFT 0.21 factors the
stored matrix, which for GPT-2's Conv1D is (in, out): it fails for a non-square Conv1D and
decomposes the transpose of a square one. On nn.Linear weights (lm_head) the two agree.
"""

from __future__ import annotations

import torch


def decompose(weight: torch.Tensor, r: int, scaling: float):
    """(A0 (r, in), B0 (out, r)) of a float32 (out, in) weight; OLoRA does not divide by the scaling."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()
