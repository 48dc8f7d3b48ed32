"""A compiled decoding step against `generate`'s eager one (`benchmark.py --only compiled`).

Beyond its products, a decoded token spends its time in the small ops between them and in the
Python that drives them. This worker asks what capturing the step removes: the step is written
with static shapes (a full-length KV cache, a mask instead of a slice, a position tensor instead
of an int), compiled once with torch.compile (inductor fuses the small ops), and the packed
products, which inductor cannot take as inputs (oneDNN's opaque tensors), are called through a
custom op. Both decode the same greedy tokens from the same prompt, in alternating rounds.
"""

from __future__ import annotations

import time

_PACKED: dict = {}  # key -> a packed weight, read by the custom op


def _packed_op():
    import torch

    from lora_gpt2.inference.layouts import blocked_linear

    @torch.library.custom_op("lora_gpt2_bench::packed_linear", mutates_args=(),
                             schema="(Tensor x, Tensor? bias, int key, int out_features) -> Tensor")
    def packed_linear(x, bias, key, out_features):
        return blocked_linear(x, _PACKED[key], bias)

    @packed_linear.register_fake
    def _(x, bias, key, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    return packed_linear


def _static_step(model, copies: dict, positions: int):
    """step(token (1, 1), position (1,), keys, values) -> the next greedy token (1,), writing the
    position's keys and values into the full-length caches."""
    import torch
    import torch.nn.functional as F

    from lora_gpt2.config import ACTIVATIONS

    op = _packed_op()
    cfg = model.config
    C, nh, hs, eps = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.layer_norm_epsilon
    approximate = ACTIVATIONS[cfg.activation]

    def product(module) -> tuple:
        if module not in copies:
            raise SystemExit("the compiled step needs every linear blocked (a CPU session)")
        _PACKED[len(_PACKED)] = copies[module].packed
        return len(_PACKED) - 1, module.bias, module.out_features

    blocks = [(b.attn_norm, product(b.attn.qkv_projection), product(b.attn.output_projection), b.ffn_norm,
               product(b.ffn.linear_in), product(b.ffn.linear_out)) for b in model.blocks]
    head = product(model.lm_head)
    wte, wpe, final = model.token_embedding.weight, model.position_embedding.weight, model.final_norm

    def linear(x, spec):
        key, bias, out = spec
        return op(x, bias, key, out)

    def step(token, position, keys, values):
        x = F.embedding(token, wte) + F.embedding(position, wpe)[None]  # (1, 1, C)
        mask = (torch.arange(positions) <= position)[None, None, None, :]
        for i, (norm1, qkv, out, norm2, up, down) in enumerate(blocks):
            h = F.layer_norm(x, (C,), norm1.weight, norm1.bias, eps)
            q, k, v = linear(h, qkv).view(1, 1, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
            keys[i].index_copy_(2, position, k)
            values[i].index_copy_(2, position, v)
            y = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask)
            x = x + linear(y.transpose(1, 2).reshape(1, 1, C), out)
            h = F.layer_norm(x, (C,), norm2.weight, norm2.bias, eps)
            x = x + linear(F.gelu(linear(h, up), approximate=approximate), down)
        x = F.layer_norm(x, (C,), final.weight, final.bias, eps)
        return linear(x[:, 0], head).argmax(dim=-1)

    return step


def worker_decode_compiled(args) -> dict:
    import torch

    from lora_gpt2.model.gpt2 import KVCache
    from benchmark_common import session as make_session

    session = make_session(args)
    model = session.model
    prompt, n = list(range(100, 116)), 64
    positions = len(prompt) + n
    step = torch.compile(_static_step(model, session.layout.copies, positions), fullgraph=True, dynamic=False)

    def decode(compiled: bool) -> list[int]:
        cache = KVCache.empty(model.config, 1, model.frozen_dtype(), "cpu", positions)
        token = model(torch.tensor([prompt]), cache, at=-1).argmax(dim=-1)  # (1,)
        out = [int(token)]
        for i in range(n - 1):
            if compiled:
                token = step(token[:, None], torch.tensor([len(prompt) + i]), cache.keys, cache.values)
            else:
                token = model(token[:, None], cache, at=-1).argmax(dim=-1)
            out.append(int(token))
        return out

    with torch.inference_mode():
        start = time.perf_counter()
        try:
            compiled_tokens = decode(True)
        except Exception as e:  # inductor needs a C++ compiler, among other things: the rest of the run goes on
            return {"unavailable": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
        compile_s = time.perf_counter() - start
        eager_tokens = decode(False)
        speeds: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(5):
            for name in speeds:
                start = time.perf_counter()
                decode(name == "compiled")
                speeds[name].append(n / (time.perf_counter() - start))
    same = next((i for i, (a, b) in enumerate(zip(compiled_tokens, eager_tokens)) if a != b), n)
    return {"compile_s": compile_s, "tokens": n, "same_tokens_before_parting": same,
            **{f"{k}_tokens_per_s": sorted(v)[len(v) // 2] for k, v in speeds.items()},
            **{f"{k}_rounds": v for k, v in speeds.items()}}
