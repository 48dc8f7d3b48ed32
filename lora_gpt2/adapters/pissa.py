"""PiSSA (Meng et al. 2024): the adapter starts as the weight's principal part, as PEFT's
`init_lora_weights="pissa"` (a full SVD) or `"pissa_niter_N"` (N iterations of randomised SVD).

W = U S V^T; A0 = sqrt(S_r / s) V_r^T, B0 = U_r sqrt(S_r / s), so s·B0A0 is W's best rank-r part
and the frozen weight trains as the rest (residual.py).
"""

from __future__ import annotations

import torch


def decompose(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A0 (r, in), B0 (out, r)) of a float32 (out, in) weight."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=niter)
        vh = v.t()
    root = torch.diag(torch.sqrt(s / scaling))
    return root @ vh, u @ root
