"""The one decoding loop: `generate --num-samples N` decodes the samples together and a seed
gives the same texts whatever the batching; past the context it slides; the session streams
text; each layer reads only its own slice of the KV cache."""

import json

import pytest
import torch

from lora_gpt2 import load_pretrained
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.adapters import lora
from lora_gpt2.inference.layouts import DecodeLayout
from lora_gpt2.inference.session import GenerationSession
from lora_gpt2.config import ModelConfig
from lora_gpt2.model.gpt2 import GPT2, KVCache

from helpers import make_hf_model, randomize_adapters, save_hf_model

PROMPT = [464, 2068, 7586, 21831]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A tiny GPT-2 with a short context (24 positions), so long samples slide their window."""
    path = save_hf_model(make_hf_model(seed=9, n_positions=24), tmp_path_factory.mktemp("short-context"))
    model = load_pretrained(path, lora=None).eval()
    return GenerationSession(model)


def texts(streams):
    return [("".join(s), s.tokens, s.finish_reason) for s in streams]


def one_at_a_time(session, cfg, seeds):
    return texts([session.stream(PROMPT, cfg, session.generator(seed)) for seed in seeds])


SAMPLED = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=60, top_p=0.95)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 8])
def test_a_seed_gives_the_same_samples_whatever_the_batching(session, batch_size):
    seeds = [11, 12, 13, 14]
    expected = one_at_a_time(session, SAMPLED, seeds)
    assert len({tuple(t) for _, t, _ in expected}) == 4  # four different samples
    assert all(len(t) == 40 for _, t, _ in expected)  # 4 + 40 > 24 positions: the window slid
    assert texts(session.stream_samples(PROMPT, SAMPLED, seeds, batch_size=batch_size)) == expected


def test_samples_that_stop_early_leave_the_batch(session):
    free = one_at_a_time(session, SAMPLED, [21, 22, 23])
    stop = free[1][1][6]  # sample 1's 7th token ends samples where it appears
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=60, top_p=0.95, stop_token=stop)
    expected = one_at_a_time(session, cfg, [21, 22, 23])
    assert len(expected[1][1]) <= 6 and expected[1][2] == "stop"
    assert len({len(t) for _, t, _ in expected}) > 1  # they end at different steps
    assert texts(session.stream_samples(PROMPT, cfg, [21, 22, 23], batch_size=3)) == expected


def test_streams_can_be_read_in_any_order(session):
    streams = session.stream_samples(PROMPT, SAMPLED, [31, 32, 33], batch_size=3)
    last_first = {i: "".join(streams[i]) for i in (2, 0, 1)}
    assert [last_first[i] for i in range(3)] == [t for t, _, _ in one_at_a_time(session, SAMPLED, [31, 32, 33])]


def test_one_batch_is_one_forward_per_step(session):
    calls = []
    hook = session.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        cfg = SamplingConfig(max_new_tokens=10, temperature=1.0)
        texts(session.stream_samples(PROMPT, cfg, [1, 2, 3, 4], batch_size=4))
    finally:
        hook.remove()
    # the prompt once (one row), then one step for all four rows per token
    assert calls == [torch.Size([1, 4])] + [torch.Size([4, 1])] * 9


def test_greedy_samples_are_all_the_greedy_text(session):
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    (alone,) = one_at_a_time(session, greedy, [0])
    assert texts(session.stream_samples(PROMPT, greedy, [0, 1, 2], batch_size=3)) == [alone] * 3


def test_cli_sample_i_is_seed_plus_i(tiny_checkpoint, cli):
    def run(*more):
        code, out, _ = cli("generate", "Once", "--model", tiny_checkpoint[0], "--max-new-tokens", "12",
                           "--temperature", "1", "--json", "--device", "cpu", *more)
        assert code == 0
        return [json.loads(line) for line in out.splitlines()]

    batched = run("--num-samples", "3", "--seed", "40")
    assert [s["seed"] for s in batched] == [40, 41, 42]
    assert run("--num-samples", "3", "--seed", "40", "--batch-size", "1") == batched
    (single,) = run("--seed", "41")
    assert single["completion"] == batched[1]["completion"]
    assert len({s["completion"] for s in batched}) == 3


def test_cli_refuses_a_seed_range_beyond_the_generator(tiny_checkpoint, cli):
    code, _, err = cli("generate", "x", "--model", tiny_checkpoint[0], "--num-samples", "4",
                       "--seed", str(2**63 - 2))
    assert code == 1
    assert err.strip() == f"lora-gpt2: error: seed must be in [0, 2**63 - num_samples], got {2**63 - 2}"


@pytest.fixture
def adapted(tmp_path):
    from lora_gpt2.config import LoRAConfig

    path = save_hf_model(make_hf_model(seed=5), tmp_path / "m")
    model = load_pretrained(path, lora=LoRAConfig(targets=("attn", "ffn", "lm_head"), r=4, alpha=8.0))
    return randomize_adapters(model, seed=1, scale=0.05).eval()


needs_blocking = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN blocked weights")


def _module_state(model):
    """Everything a module carries, by path: what a decode-time layout must leave as it was."""
    return {name: (sorted(vars(m)), dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for name, m in model.named_modules()}


@needs_blocking
def test_blocked_decoding_weights_give_the_same_logits(adapted):
    ids = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = adapted(ids)
        with DecodeLayout(adapted) as layout:
            assert len(layout.copies) == 2 * 4 + 1  # 4 linear layers per block, 2 blocks, lm_head
            blocked = adapted(ids)
    torch.testing.assert_close(blocked, plain, rtol=0, atol=2e-5)


@needs_blocking
def test_a_decode_layout_leaves_nothing_on_the_model(adapted):
    """The layer holds its maths: a session's blocked copies live in the session, and when it
    ends every module has exactly the attributes and hooks it had, and computes as before."""
    before = _module_state(adapted)
    ids = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        plain = adapted(ids)
    session = GenerationSession(adapted)
    assert _module_state(adapted) != before  # installed: forwards are swapped
    session.close()
    assert _module_state(adapted) == before
    layer = adapted.blocks[0].attn.qkv_projection
    assert "forward" not in vars(layer) and type(layer).forward is lora.Linear.forward
    with torch.inference_mode():
        assert torch.equal(adapted(ids), plain)


@needs_blocking
def test_decoding_folds_each_update_into_its_blocked_copy_and_notices_changes(adapted):
    """While decoding, an adapted layer is one product with W + s·B·A; changed adapter tensors, a
    disabled adapter or a merge go back to the exact unfolded forward."""
    ids = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(4))
    layer = adapted.blocks[0].attn.qkv_projection
    x = torch.randn(2, 7, layer.in_features)
    layout = DecodeLayout(adapted)
    with torch.inference_mode():
        plain, plain_layer = adapted(ids), layer(x)
        layout.install()
        blocked = layout.copies[layer].packed
        assert torch.equal(layer(x), torch.ops.mkldnn._linear_pointwise(x, blocked, layer.bias, "none", [], ""))
        torch.testing.assert_close(layer(x), plain_layer, rtol=0, atol=2e-5)
        torch.testing.assert_close(adapted(ids), plain, rtol=0, atol=2e-5)
        with adapted.lora_disabled():  # the base model: the folded copy must not be read
            base = adapted(ids)
    layout.remove()
    with torch.inference_mode(), adapted.lora_disabled():
        torch.testing.assert_close(base, adapted(ids), rtol=0, atol=0)
    layout.install()
    with torch.no_grad():  # new adapter values after blocking (e.g. another adapter loaded in place)
        for m in adapted.lora_layers().values():
            m.lora_b.mul_(-2.0)
    with torch.inference_mode():
        changed = adapted(ids)
    layout.remove()
    with torch.inference_mode():
        torch.testing.assert_close(changed, adapted(ids), rtol=0, atol=0)  # computed unfolded, exactly
        assert (changed - plain).abs().max() > 1e-2


@needs_blocking
def test_training_and_merging_never_read_a_blocked_copy(adapted):
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = adapted(ids, targets=ids).item()
    layout = DecodeLayout(adapted)
    layout.install()
    with torch.inference_mode():
        before = adapted(ids)
    adapted.merge()  # folds the updates into the weights: copies of the old ones must not be read
    with torch.inference_mode():
        torch.testing.assert_close(adapted(ids), before, rtol=0, atol=5e-5)
    adapted.unmerge()
    layout.install()
    for copy in layout.copies.values():  # spoil every blocked copy: a read of one would show
        copy.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(copy.module.weight))
    loss = adapted(ids, targets=ids)  # with gradients: F.linear on the real weights
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)
    layout.remove()


def test_layer_caches_cannot_be_mixed_up():
    cfg = ModelConfig(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    model = GPT2(cfg)
    cache = KVCache.empty(cfg, 1, torch.float32, "cpu")
    with pytest.raises(TypeError, match=r"its own slice of the cache \(KVCache.layer\(i\)\), got KVCache"):
        model.blocks[1].attn(torch.zeros(1, 3, 8), cache)
    out = model.blocks[1].attn(torch.zeros(1, 3, 8), cache.layer(1))  # its own slice works
    assert out.shape == (1, 3, 8) and cache.length == 0


def test_generation_past_the_context_equals_fresh_recomputation_of_each_slid_window(small_vocab_checkpoint):
    """Past the context the cache is rebuilt from the last `window_length` tokens: every greedy token
    must equal the argmax of a fresh forward pass over the window the model had at that moment."""
    from lora_gpt2.inference.decoding import window_length
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.session import generate

    model = load_pretrained(small_vocab_checkpoint[0], targets=())  # n_positions 32
    context, keep = 32, window_length(32)
    prompt = [5, 9, 17]
    history = prompt + list(generate(model, prompt, SamplingConfig(max_new_tokens=60, temperature=0)))
    start, checked = 0, 0
    with torch.no_grad():
        for i in range(len(prompt), len(history)):
            if i - start > context:  # the cache was full: it restarted from the last `keep` tokens
                start = i - keep
            fresh = model(torch.tensor([history[start:i]]))[0, -1]
            assert history[i] == int(fresh.argmax()), i
            checked += start > 0
    assert start > 0 and checked >= 20  # several slides happened and were checked


def test_generation_session_streams_text_pieces_and_stops_at_the_stop_token(tiny_checkpoint):
    from lora_gpt2 import tokenizer
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.session import GenerationSession

    session = GenerationSession(load_pretrained(tiny_checkpoint[0], targets=()))
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=None)
    stream = session.stream("ROMEO:", cfg, session.generator(3))
    pieces = list(stream)
    assert "".join(pieces) == tokenizer.decode(stream.tokens) or "\ufffd" in "".join(pieces)
    assert len(stream.tokens) == 30 and stream.finish_reason == "length"
    # the same seed with the first sampled token as the stop token ends before emitting it
    stop = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=None, stop_token=stream.tokens[0])
    stopped = session.stream("ROMEO:", stop, session.generator(3))
    assert list(stopped) == [] and stopped.tokens == [] and stopped.finish_reason == "stop"
