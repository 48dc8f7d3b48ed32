"""Next-token cross-entropy fused with the lm_head projection, chunk by chunk.

Full logits for a batch are (tokens x 50257): 200 MB in float32 for 1,024 tokens, plus as
much again for their gradient. Here each chunk's logits live only while its loss and its
gradients are computed, in the forward pass itself (softmax - one-hot is the gradient of
cross-entropy), so what autograd keeps is the (tokens x d) gradient of the hidden states.
The softmax and the loss are always computed in float32. A target < 0 (padding, a masked
prompt) adds nothing to the loss or the gradients; "mean" divides by the counted targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters.lora import head_terms

CHUNK_TOKENS = 256


class _FusedLMHeadLoss(torch.autograd.Function):
    """Summed CE of (h @ W^T + scaling * (h @ A^T) @ B^T) against targets (< 0: not counted),
    divided by `divisor`; A, B optional (LoRA)."""

    @staticmethod
    def forward(ctx, h, weight, targets, lora_a, lora_b, scaling, chunk, grad_enabled, divisor, partial):
        n = h.size(0)
        # forward runs with grad mode off, so the caller says whether gradients are wanted
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_lora = grad_enabled and lora_a is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        a = lora_a.to(h.dtype) if lora_a is not None else None
        b = lora_b.to(h.dtype) if lora_b is not None else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_a = torch.zeros_like(lora_a) if need_lora else None
        grad_b = torch.zeros_like(lora_b) if need_lora else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # Every chunk writes into the same (chunk, V) buffers. New ones for each chunk would be
        # fresh memory each time: under training's allocator setting (allocator.py) blocks this
        # large are mapped when allocated and unmapped when freed, so each new one is faulted in
        # page by page (measured on a 2-layer model: 26% of a step).
        rows_max, vocab = min(chunk, n), weight.size(0)
        logits_buffer = torch.empty(rows_max, vocab, dtype=h.dtype, device=h.device)
        update_buffer = torch.empty_like(logits_buffer) if a is not None else None
        logp_buffer = torch.empty(rows_max, vocab, dtype=torch.float32, device=h.device)
        grad_buffer = logits_buffer if h.dtype != torch.float32 and (need_h or need_lora) else None
        for start in range(0, n, chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]  # (c, d), (c,)
            c = hc.size(0)
            if partial:
                keep = tc >= 0  # (c,)
                tc = tc.clamp(min=0)
            logits = torch.matmul(hc, weight.T, out=logits_buffer[:c])  # (c, V)
            if a is not None:
                low = F.linear(hc, a)  # (c, r)
                logits.add_(torch.matmul(low, b.T, out=update_buffer[:c]), alpha=scaling)
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buffer[:c])  # (c, V), one fused pass
            rows = torch.arange(logp.size(0), device=logp.device)
            picked = logp[rows, tc]  # (c,)
            total -= (picked * keep).sum() if partial else picked.sum()
            if not (need_h or need_lora):
                continue
            # d(sum CE)/d(logits) = softmax - onehot, built in place over the log-probabilities
            g = logp.exp_()
            g[rows, tc] -= 1.0
            if partial:
                g *= keep.unsqueeze(1)  # an ignored target has no gradient
            if grad_buffer is not None:  # the logits are spent: their buffer takes the gradient in h's dtype
                g = grad_buffer[:c].copy_(g)  # (c, V)
            g_low = g @ b if a is not None else None  # (c, r)
            if need_h:
                gh = g @ weight  # (c, d)
                grad_h[start : start + chunk] = gh if a is None else torch.add(gh, g_low @ a, alpha=scaling)
            if need_lora:
                grad_b += (g.T @ low).float() * scaling  # (V, r)
                grad_a += (g_low.T @ hc).float() * scaling  # (r, d)
        ctx.divisor = divisor
        ctx.save_for_backward(grad_h, grad_a, grad_b)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_a, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.divisor
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            None,
            None,
            grad_a * scale if grad_a is not None else None,
            grad_b * scale if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


REDUCTIONS = ("mean", "sum")


def fused_lm_head_loss(h: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                       chunk: int = CHUNK_TOKENS, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of hidden states h (B, T, d) through `lm_head` against targets (B, T):
    the mean over the counted targets (those >= 0), or their sum.

    The output layer says what the fused path may use (`lora.head_terms`); a layer that cannot
    say (dropout on its LoRA input while training, a variant with other maths) is computed
    through its own forward, which is always right, only not as lean.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    flat_h = h.reshape(-1, h.size(-1))  # (B*T, d)
    flat_t = targets.reshape(-1)  # (B*T,)
    terms = head_terms(lm_head)
    if terms is None:
        # (B, T, d) in, not flattened: a bank's per-row updates need the rows (inference/bank.py)
        return F.cross_entropy(lm_head(h).flatten(0, 1).float(), flat_t, ignore_index=-1, reduction=reduction)
    counted = int((flat_t >= 0).sum())  # one host sync per call, not one per chunk
    # an empty count gives 0/0 = nan, as F.cross_entropy's mean does
    divisor = 1 if reduction == "sum" else counted
    return _FusedLMHeadLoss.apply(flat_h, terms.weight, flat_t, terms.lora_a, terms.lora_b, terms.scaling,
                                  chunk, torch.is_grad_enabled(), divisor, counted < flat_t.numel())
