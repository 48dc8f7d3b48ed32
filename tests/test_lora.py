import math

import pytest
import torch
import torch.nn.functional as F

from lora_gpt2.adapters import lora
from lora_gpt2.config import LoRAConfig, ModelConfig, resolve_targets
from lora_gpt2.model.gpt2 import GPT2
from lora_gpt2 import load_pretrained


def test_linear_follows_the_spec():
    torch.manual_seed(0)
    layer = lora.Linear(10, 6, bias=True, r=4, alpha=8)
    assert layer.scaling == 2.0
    assert layer.weight.shape == (6, 10) and layer.bias.shape == (6,)
    assert layer.lora_a.shape == (4, 10) and layer.lora_b.shape == (6, 4)
    assert torch.count_nonzero(layer.lora_b) == 0
    # kaiming_uniform_(a=sqrt(5)) on (r, in) draws from U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(10)
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > bound / 2
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 5, 10)
    expected = F.linear(x, layer.weight, layer.bias) + (x @ layer.lora_a.T @ layer.lora_b.T) * 2.0
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_alpha_defaults_to_rank_so_scaling_is_one():
    assert lora.Linear(4, 4, bias=False, r=16).scaling == 1.0
    assert lora.Embedding(10, 4, r=3).scaling == 1.0
    assert LoRAConfig(r=16).scaling == 1.0 and LoRAConfig(r=8, alpha=16).scaling == 2.0


def test_embedding_follows_the_spec():
    torch.manual_seed(0)
    layer = lora.Embedding(20, 6, r=3, alpha=6)
    assert layer.lora_a.shape == (3, 20) and layer.lora_b.shape == (6, 3)
    assert torch.count_nonzero(layer.lora_b) == 0
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randint(0, 20, (2, 7))
    expected = F.embedding(x, layer.weight) + (F.embedding(x, layer.lora_a.T) @ layer.lora_b.T) * 2.0
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_zero_b_means_output_equals_plain_layer():
    torch.manual_seed(1)
    layer = lora.Linear(8, 5, bias=True, r=2)
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    emb = lora.Embedding(11, 5, r=2)
    ids = torch.randint(0, 11, (3,))
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))


@pytest.mark.parametrize("make", [lambda: lora.Linear(12, 7, True, r=3, alpha=5),
                                  lambda: lora.Embedding(15, 7, r=3, alpha=5)])
def test_merge_equals_unmerged_forward_and_is_idempotent(make):
    torch.manual_seed(2)
    layer = make()
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randint(0, 12, (4, 3)) if isinstance(layer, lora.Embedding) else torch.randn(4, 12)
    before = layer(x)
    original = layer.weight.clone()
    layer.merge()
    merged_weight = layer.weight.clone()
    layer.merge()  # a second merge is a no-op
    assert torch.equal(layer.weight, merged_weight)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)


def test_eval_does_not_merge_and_the_update_stays_a_separate_path():
    torch.manual_seed(5)
    layer = lora.Linear(6, 4, True, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_b.normal_()
    frozen = layer.weight.detach().clone()
    x = torch.randn(3, 6)
    layer.eval()
    out = layer(x)
    assert torch.equal(layer.weight, frozen)  # nothing folded in behind .eval()
    torch.testing.assert_close(out, F.linear(x, frozen, layer.bias) + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T),
                               rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.lora_b.zero_()  # a change to the adapter shows at once: it was not merged
    torch.testing.assert_close(layer(x), F.linear(x, frozen, layer.bias), rtol=0, atol=0)


def test_optimizer_step_changes_only_lora_tensors():
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2(cfg, LoRAConfig(targets=("all",), r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.lora_parameters(model))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = torch.randint(0, 50, (2, 8))
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(torch.count_nonzero(p) for n, p in lora.lora_parameters(model).items() if n.endswith("lora_b"))


def test_untargeted_modules_have_no_lora_parameters():
    cfg = ModelConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2(cfg, LoRAConfig(targets=("qkv_projection", "lm_head"), r=2))
    names = set(lora.lora_parameters(model))
    assert names == {
        "blocks.0.attn.qkv_projection.lora_a", "blocks.0.attn.qkv_projection.lora_b",
        "blocks.1.attn.qkv_projection.lora_a", "blocks.1.attn.qkv_projection.lora_b",
        "lm_head.lora_a", "lm_head.lora_b",
    }
    assert type(model.blocks[0].ffn.linear_in) is lora.FrozenLinear
    assert model.lm_head.weight is model.token_embedding.weight
    assert lora.count_parameters(model) == (2 * (2 * 16 + 48 * 2) + (2 * 16 + 50 * 2),
                                            sum(p.numel() for p in model.parameters()))


def test_merged_logits_equal_unmerged_with_tied_embedding():
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=60, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2(cfg, LoRAConfig(targets=("all",), r=2, alpha=3))
    with torch.no_grad():
        for name, p in lora.lora_parameters(model).items():
            p.normal_(std=0.2)
    idx = torch.randint(0, 60, (2, 10))
    before = model(idx)
    model.merge()
    assert not model.tied  # both halves of the tied pair changed: lm_head got its own copy
    torch.testing.assert_close(model(idx), before, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "rank r must be >= 1, got 0"),
    (dict(r=-2), "rank r must be >= 1, got -2"),
    (dict(r=4, alpha=0), "alpha must be > 0, got 0"),
    (dict(r=4, alpha=-1.0), "alpha must be > 0, got -1.0"),
    (dict(r=4, dropout=1.0), "dropout must be in [0, 1), got 1.0"),
])
def test_invalid_lora_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        lora.Linear(4, 4, True, **kwargs)
    with pytest.raises(ValueError):
        LoRAConfig(**kwargs)


def test_non_positive_sizes_are_rejected():
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        lora.Linear(0, 4, True, r=1)
    with pytest.raises(ValueError, match="embedding_dim must be a positive integer, got -3"):
        lora.Embedding(4, -3, r=1)


def test_targets_resolve_groups_and_reject_unknown_names():
    assert resolve_targets("attn,lm_head") == ("qkv_projection", "output_projection", "lm_head")
    assert resolve_targets(["ffn"]) == ("linear_in", "linear_out")
    assert resolve_targets("embeddings") == ("token_embedding", "position_embedding")
    assert len(resolve_targets("all")) == 7
    with pytest.raises(ValueError, match=r"unknown LoRA target 'c_attn'; valid targets: token_embedding"):
        resolve_targets("c_attn")


def test_sequence_longer_than_context_is_a_value_error():
    cfg = ModelConfig(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = GPT2(cfg)
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than the model's context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("targets, dtype", [((), torch.float32), (("lm_head", "qkv_projection"), torch.float32),
                                            (("all",), torch.float32), (("lm_head",), torch.bfloat16)])
def test_fused_loss_and_gradients_equal_the_plain_computation(targets, dtype):
    from lora_gpt2.model import loss as loss_module

    torch.manual_seed(6)
    cfg = ModelConfig(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = GPT2(cfg, LoRAConfig(targets=targets, r=2, alpha=4))
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(std=0.3)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    h_leaf = model.hidden_states(x).detach().requires_grad_()
    plain = F.cross_entropy(model.lm_head(h_leaf).float().flatten(0, 1), y.flatten())
    plain.backward()
    reference = {n: p.grad.clone() for n, p in lora.lora_parameters(model).items() if n.startswith("lm_head")}
    reference_h = h_leaf.grad.clone()
    model.zero_grad()
    h_leaf.grad = None
    fused = loss_module.fused_lm_head_loss(h_leaf, model.lm_head, y, chunk=7)  # chunks that do not divide 60
    (fused * 3).backward()  # the upstream gradient scales every result
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(h_leaf.grad.float(), 3 * reference_h.float(), **tol)
    for name, grad in reference.items():
        torch.testing.assert_close(lora.lora_parameters(model)[name].grad, 3 * grad, **tol)
    if not targets:
        return
    # through the model's own forward, every LoRA gradient matches the unfused graph too
    model.zero_grad()
    F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).backward()
    unfused = {n: p.grad.clone() for n, p in lora.lora_parameters(model).items()}
    model.zero_grad()
    model(x, targets=y).backward()
    for name, grad in unfused.items():
        torch.testing.assert_close(lora.lora_parameters(model)[name].grad, grad, **tol)


@pytest.mark.parametrize("adapted", [False, True])
def test_fused_loss_faults_in_its_chunk_buffers_once_not_once_per_chunk(adapted):
    """Under training's allocator setting (allocator.py: blocks of 1 MB and more are mapped fresh
    and returned when freed), every new (chunk x vocab) tensor is memory the kernel must fault in,
    page by page. A loss over 16 chunks reuses its two chunk buffers: it faults in about 2
    buffers' pages, where a new pair per chunk faulted in 32 (4 x 16 = 64k pages here)."""
    import resource

    from lora_gpt2 import allocator
    from lora_gpt2.model import loss as loss_module

    assert allocator.return_large_frees()
    torch.manual_seed(0)
    vocab, chunk, chunks = 8192, 256, 16
    head = lora.Linear(16, vocab, False, r=2, alpha=2) if adapted else lora.FrozenLinear(16, vocab, False)
    if adapted:
        with torch.no_grad():
            head.lora_b.normal_(std=0.1)
    h = torch.randn(chunks * chunk, 16, requires_grad=True)
    y = torch.randint(0, vocab, (chunks * chunk,))
    loss_module.fused_lm_head_loss(h, head, y, chunk=chunk).backward()  # warm-up: lazy set-up faults too
    buffer_pages = chunk * vocab * 4 // resource.getpagesize()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss_module.fused_lm_head_loss(h, head, y, chunk=chunk).backward()
    faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faulted < 4 * buffer_pages, f"{faulted} page faults; one chunk buffer is {buffer_pages} pages"


def test_merge_then_unmerge_leaves_the_tied_pair_tied_and_merged_state_dict_leaves_the_model_alone(tiny_checkpoint):
    from lora_gpt2.checkpoints.merged import merged_state_dict

    model = load_pretrained(tiny_checkpoint[0], targets=("token_embedding", "lm_head"), r=2)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(std=0.1)
    embedding = model.token_embedding.weight.clone()
    state, tied = merged_state_dict(model)
    assert tied is False and "lm_head.weight" in state
    assert model.tied and model.lm_head.weight is model.token_embedding.weight
    assert not any(layer.merged for layer in model.lora_layers().values())
    torch.testing.assert_close(model.token_embedding.weight, embedding, rtol=0, atol=1e-6)
