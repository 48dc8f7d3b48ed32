"""lora-gpt2's GPT-2 equals Hugging Face's on the same weights: logits and greedy text."""

import math

import pytest
import torch

from lora_gpt2 import load_pretrained
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.inference.session import generate
from lora_gpt2.model.gpt2 import KVCache

from helpers import make_hf_model, save_hf_model


def greedy_ours(model, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0)
    return [int(t) for t in generate(model, prompt, cfg)]


def greedy_hf(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("targets", [(), ("all",), ("qkv_projection", "lm_head")])
def test_logits_equal_transformers_tiny(tiny_checkpoint, targets):
    path, hf = tiny_checkpoint
    model = load_pretrained(path, targets=targets, r=4)
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_greedy_generation_equals_transformers_tiny(tiny_checkpoint):
    path, hf = tiny_checkpoint
    model = load_pretrained(path, targets=("all",), r=2)
    prompt = [464, 3290, 373, 257, 1110]
    assert greedy_ours(model, prompt, 20) == greedy_hf(hf, prompt, 20)


def test_kv_cache_logits_equal_full_recomputation(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = load_pretrained(path, targets=(), r=2)
    idx = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.empty(model.config, 2, torch.float32, "cpu")
        steps = [model(idx[:, :12], cache)]  # a prefill, then a chunk, then single tokens
        steps.append(model(idx[:, 12:20], cache))
        steps += [model(idx[:, t : t + 1], cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


def test_untied_checkpoint_without_transformer_prefix(tmp_path):
    """The original `gpt2` upload has keys like `h.0.attn.c_attn.weight` and mask buffers."""
    from safetensors.torch import save_file

    hf = make_hf_model(seed=5, vocab_size=100, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # an old causal-mask buffer
    save_file(state, tmp_path / "model.safetensors")
    model = load_pretrained(str(tmp_path), targets=("lm_head",), r=2)
    assert not model.tied
    idx = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_gpt2_small_logits_and_greedy_text_equal_transformers(tmp_path):
    hf = make_hf_model(seed=7, n_layer=12, n_head=12, n_embd=768, n_positions=1024)
    path = save_hf_model(hf, tmp_path)
    model = load_pretrained(path, targets=("qkv_projection",), r=8)
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)
    prompt = idx[0, :8].tolist()
    assert greedy_ours(model, prompt, 20) == greedy_hf(hf, prompt, 20)


def test_bfloat16_storage_keeps_frozen_weights_bf16_and_lora_fp32(tiny_checkpoint):
    """bf16 storage differs from float32 arithmetic on the same (bf16-rounded) weights only by bf16
    rounding of the activations: within 3 bf16 ulps of the largest logit, not a loose fraction."""
    path, _ = tiny_checkpoint
    model = load_pretrained(path, targets=("qkv_projection",), dtype=torch.bfloat16)
    assert model.token_embedding.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.qkv_projection.lora_a.dtype == torch.float32
    reference = load_pretrained(path, targets=())
    with torch.no_grad():
        for p in reference.parameters():
            p.data = p.data.to(torch.bfloat16).float()
    for seed in range(3):
        idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ours, ref = model(idx).float(), reference(idx)
        ulp = 2.0 ** (math.floor(math.log2(ref.abs().max().item())) - 7)  # bf16 keeps 8 significant bits
        assert (ours - ref).abs().max() <= 3 * ulp
