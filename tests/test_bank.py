"""Many adapters over one base model in one batch (bank.py): every row equals its adapter alone."""

import pytest
import torch

from lora_gpt2 import load_pretrained
from lora_gpt2.inference.bank import AdapterBank
from lora_gpt2.config import LoRAConfig
from lora_gpt2.errors import CheckpointError
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.inference.session import generate
from lora_gpt2.adapters.lora import lora_parameters
from lora_gpt2.model.gpt2 import KVCache

from helpers import make_hf_model, randomize_adapters, save_hf_model

ADAPTERS = {  # different targets, ranks, scalings and blocks, so padding and missing layers show
    "attn": LoRAConfig(targets=("attn",), r=4, alpha=8.0),
    "everything": LoRAConfig(targets=("ffn", "lm_head", "token_embedding", "position_embedding"), r=2,
                             alpha=4.0, rslora=True),
    "last-block": LoRAConfig(targets=("qkv_projection", "linear_out"), r=8, layers="1"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = save_hf_model(make_hf_model(seed=6), tmp_path_factory.mktemp("bank-base"))
    singles, bank_model = {}, load_pretrained(path, lora=LoRAConfig(targets=())).eval()
    bank = AdapterBank(bank_model)
    for i, (name, config) in enumerate(ADAPTERS.items()):
        model = randomize_adapters(load_pretrained(path, lora=config).eval(), seed=10 + i, scale=0.1)
        singles[name] = model
        bank.add(name, config, {k: v.detach().clone() for k, v in lora_parameters(model).items()})
    singles[None] = load_pretrained(path, lora=LoRAConfig(targets=())).eval()
    return path, singles, bank


ROWS = ["attn", None, "everything", "last-block", "attn"]


def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(world):
    _, singles, bank = world
    ids = torch.randint(0, 50257, (len(ROWS), 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), bank.rows(ROWS):
        mixed = bank.model(ids)
    with torch.inference_mode():
        for i, name in enumerate(ROWS):
            alone = singles[name](ids[i : i + 1])
            assert (alone - singles[None](ids[i : i + 1])).abs().max() > 1e-2 or name is None  # it changes logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5, msg=str(name))
    with torch.inference_mode():  # outside `rows`, the bank's model is the base model
        torch.testing.assert_close(bank.model(ids), singles[None](ids), rtol=0, atol=0)


def test_greedy_decoding_in_a_mixed_batch_equals_generate_for_each_adapter(world):
    _, singles, bank = world
    prompt = [464, 2068, 7586, 21831, 18045]
    expected = [list(generate(singles[n], prompt, SamplingConfig(max_new_tokens=10, temperature=0))) for n in ROWS]
    model, n = bank.model, len(ROWS)
    got = [[] for _ in ROWS]
    with torch.inference_mode(), bank.rows(ROWS):
        cache = KVCache.empty(model.config, n, model.frozen_dtype(), "cpu", 32)
        logits = model(torch.tensor([prompt] * n), cache)[:, -1]
        for _ in range(10):
            tokens = logits.argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                got[row].append(token)
            logits = model(tokens[:, None], cache)[:, -1]
    assert got == expected
    assert len({tuple(t) for t in got}) > 2  # the adapters really decode differently


def test_the_loss_through_a_bank_counts_the_rows_updates(world):
    _, singles, bank = world
    ids = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), bank.rows(["everything", "everything"]):
        mixed = bank.model(ids, targets=ids).item()
    with torch.no_grad():
        alone = singles["everything"](ids, targets=ids).item()
    assert mixed == pytest.approx(alone, rel=1e-6)


def test_what_a_bank_refuses(world):
    path, singles, bank = world
    tensors = {k: v.detach() for k, v in lora_parameters(singles["attn"]).items()}
    with pytest.raises(ValueError, match="adapter name 'attn' is given twice"):
        bank.add("attn", ADAPTERS["attn"], tensors)
    with pytest.raises(CheckpointError, match="is a dora adapter: its magnitude rescales whole outputs"):
        bank.add("dora", LoRAConfig(targets=("attn",), r=4, variant="dora"), tensors)
    wrong = dict(tensors)
    wrong["blocks.0.attn.qkv_projection.lora_a"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match="tensor blocks.0.attn.qkv_projection.lora_a is missing, unexpected"):
        bank.add("wrong", ADAPTERS["attn"], wrong)
    with pytest.raises(ValueError, match="unknown adapter 'nope'; loaded: attn, everything, last-block"):
        with bank.rows(["attn", "nope"]):
            pass
    with pytest.raises(ValueError, match="needs the base model without LoRA layers"):
        AdapterBank(singles["attn"])


def test_adapters_from_disk_lora_gpt2_and_peft(world, tmp_path):
    from safetensors.torch import load_file

    from lora_gpt2.checkpoints import adapter_dir as checkpoint
    from lora_gpt2.checkpoints.reading import read_adapter
    from lora_gpt2.checkpoints.peft import export_peft

    path, singles, _ = world
    base = load_pretrained(path, lora=LoRAConfig(targets=())).eval()
    bank = AdapterBank(base)
    checkpoint.save_checkpoint(tmp_path / "attn", singles["attn"], None, step=0)
    bank.add_adapter("ours", read_adapter(tmp_path / "attn"))
    checkpoint.save_checkpoint(tmp_path / "last", singles["last-block"], None, step=0)
    export_peft(load_file(tmp_path / "last" / "adapter.safetensors"), ADAPTERS["last-block"], 2, path, tmp_path / "peft")
    bank.add_adapter("peft", read_adapter(tmp_path / "peft"))
    ids = torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), bank.rows(["peft", "ours", None]):
        mixed = bank.model(ids)
    with torch.inference_mode():
        for i, name in enumerate(["last-block", "attn", None]):
            torch.testing.assert_close(mixed[i : i + 1], singles[name](ids[i : i + 1]), rtol=0, atol=1e-5)
    other = save_hf_model(make_hf_model(seed=7), tmp_path / "other-base")
    stranger = AdapterBank(load_pretrained(other, lora=LoRAConfig(targets=())))
    with pytest.raises(CheckpointError, match="was trained on base .* but the served model has fingerprint"):
        stranger.add_adapter("ours", read_adapter(tmp_path / "attn"))


def run_all(decoder, requests_at):
    """Submit requests at the given steps, step until all are done; (request, its tokens) in order."""
    step, out, pending = 0, [], list(requests_at)
    while pending or decoder.busy:
        while pending and pending[0][0] <= step:
            _, args = pending.pop(0)
            out.append(decoder.submit(*args))
        decoder.step()
        step += 1
    return out


@pytest.mark.parametrize("max_batch", [16, 2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_equals_generate_for_every_request(world, max_batch, temperature):
    """Three adapters and the base, prompts of different lengths, joining at different steps:
    each request gets exactly what `generate` gives it alone (greedy, and sampled with its seed)."""
    from lora_gpt2.inference.decoding import Decoder

    _, singles, bank = world
    plan = [(0, [464, 2068, 7586], "attn", 9, 1), (0, [50256], None, 12, 2),
            (2, [464, 2068, 7586, 21831, 18045, 625, 262], "everything", 7, 3), (3, [40, 1101], "last-block", 10, 4),
            (3, [464, 2068, 7586], "attn", 6, 5)]
    cfgs = [SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=50) for *_, n, _ in plan]
    decoder = Decoder(bank.model, bank, max_batch=max_batch)
    done = run_all(decoder, [(at, (prompt, name, cfg, seed))
                             for (at, prompt, name, _, seed), cfg in zip(plan, cfgs)])
    for request, (_, prompt, name, n, seed), cfg in zip(done, plan, cfgs):
        alone = list(generate(singles[name], prompt, cfg, generator=torch.Generator().manual_seed(seed)))
        assert request.tokens == alone, name
        assert request.finish_reason == ("length" if len(alone) == n else "stop")
    assert len({tuple(r.tokens) for r in done}) >= 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_joining_together_are_prefilled_together_and_stay_exact(world, temperature):
    """Six requests at once over three adapters and the base: two prefill forwards (grouped by
    prompt length), and each request still gets exactly what `generate` gives it alone."""
    from lora_gpt2.inference.decoding import Decoder

    _, singles, bank = world
    prompts = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 383, 2068], [464, 2068, 7586],
               [50256], [40, 1101, 257], [464, 2068, 7586, 21831], [464, 2068, 7586, 21831, 18045]]
    names = ["attn", "everything", None, "last-block", "attn", "everything"]
    cfg = SamplingConfig(max_new_tokens=8, temperature=temperature, top_k=50)
    decoder = Decoder(bank.model, bank, max_batch=16)
    requests = [decoder.submit(p, n, cfg, seed=30 + i) for i, (p, n) in enumerate(zip(prompts, names))]
    model, calls = bank.model, []
    model.hidden_states = lambda *a, **k: calls.append(a[0].shape) or type(model).hidden_states(model, *a, **k)
    try:
        decoder.step()
    finally:
        del model.hidden_states
    # lengths 1, 3, 3, 4 pad to 4 x 4 = 16 positions for 11 tokens; 5 and 12 to 2 x 12 for 17;
    # then the first decoding step, one row per request
    assert calls == [(4, 4), (2, 12), (6, 1)]
    while decoder.busy:
        decoder.step()
    for i, (request, prompt, name) in enumerate(zip(requests, prompts, names)):
        alone = list(generate(singles[name], prompt, cfg, generator=torch.Generator().manual_seed(30 + i)))
        assert request.tokens == alone, name


def test_prefill_groups_bound_the_padding():
    from lora_gpt2.inference.decoding import PREFILL_TOKENS, Sequence, prefill_groups

    def lengths(*ns):
        groups = prefill_groups([Sequence([1] * n, None, SamplingConfig(), None) for n in ns])
        return [[len(r.prompt) for r in g] for g in groups]

    assert lengths(12, 3, 1, 5, 3, 4) == [[1, 3, 3, 4], [5, 12]]
    assert lengths(7) == [[7]] and lengths() == []
    assert lengths(10, 10, 500) == [[10, 10], [500]]  # one long prompt does not pad the short ones
    half = PREFILL_TOKENS // 2
    assert lengths(half, half, half) == [[half, half], [half]]  # at most PREFILL_TOKENS positions


def test_stops_and_cancellations_leave_the_others_untouched(world):
    from lora_gpt2.inference.decoding import Decoder

    _, singles, bank = world
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    free = list(generate(singles["attn"], [464, 2068], greedy))
    j = next(j for j in range(1, 10) if free[j] not in free[:j])  # a token that first appears at j
    stopping = SamplingConfig(max_new_tokens=10, temperature=0, stop_token=free[j])
    decoder = Decoder(bank.model, bank)
    a = decoder.submit([464, 2068], "attn", stopping)
    b = decoder.submit([464, 2068], "everything", greedy)
    c = decoder.submit([464, 2068], "last-block", greedy)
    decoder.step()
    decoder.step()
    decoder.cancel(c)
    while decoder.busy:
        decoder.step()
    assert a.tokens == free[:j] and a.finish_reason == "stop"
    assert b.tokens == list(generate(singles["everything"], [464, 2068], greedy)) and b.finish_reason == "length"
    assert c.finish_reason == "cancelled" and len(c.tokens) == 2 and c.cache is None


def test_a_request_whose_logits_are_not_finite_fails_alone(world):
    """An adapter with an infinite tensor: its request ends with an error; the requests that
    shared its batches are untouched (rows never mix), through the decoder and the server's engine."""
    import queue

    from lora_gpt2.inference.decoding import Decoder
    from lora_gpt2.serve.engine import Engine, Job

    path, singles, _ = world
    bank = AdapterBank(load_pretrained(path, lora=LoRAConfig(targets=())).eval())
    tensors = {k: v.detach().clone() for k, v in lora_parameters(singles["attn"]).items()}
    bank.add("attn", ADAPTERS["attn"], tensors)
    broken = dict(tensors)
    key = next(k for k in broken if k.endswith("lora_b"))
    broken[key] = torch.full_like(broken[key], float("inf"))
    bank.add("broken", ADAPTERS["attn"], broken)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    decoder = Decoder(bank.model, bank)
    good, bad, base = (decoder.submit([464, 2068], name, greedy) for name in ("attn", "broken", None))
    while decoder.busy:
        decoder.step()
    assert bad.finish_reason == "error" and "not finite" in bad.error and bad.tokens == []
    assert good.tokens == list(generate(singles["attn"], [464, 2068], greedy))
    assert base.tokens == list(generate(singles[None], [464, 2068], greedy))

    engine, events = Engine(bank).start(), queue.SimpleQueue()
    try:
        for name in ("broken", "attn"):
            engine.submit(Job([464, 2068], name, greedy, None, None, lambda kind, value, n=name: events.put((n, kind))))
        got = [events.get(timeout=30) for _ in range(1 + 6 + 1)]  # broken's error; attn's 6 tokens and end
    finally:
        engine.stop()
    assert ("broken", "error") in got and got.count(("attn", "token")) == 6 and got[-1] == ("attn", "end")


def test_a_decoder_refuses_what_cannot_run(world):
    from lora_gpt2.inference.decoding import Decoder

    _, _, bank = world
    decoder = Decoder(bank.model, bank)
    context = bank.model.config.n_positions
    with pytest.raises(ValueError, match=f"prompt of 10 tokens \\+ max_tokens {context} is more than the "
                                         f"model's context of {context}"):
        decoder.submit([1] * 10, None, SamplingConfig(max_new_tokens=context))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        decoder.submit([1], "nope", SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="the prompt is empty"):
        decoder.submit([], None, SamplingConfig(max_new_tokens=2))
    assert not decoder.busy


def test_removed_slots_are_reused_and_leave_nothing_behind(world):
    """Remove and add in every order: each row still equals its adapter alone, a reused slot holds
    nothing of its previous adapter (a larger rank, other modules), and the bank ends empty."""
    path, singles, _ = world
    bank = AdapterBank(load_pretrained(path, lora=LoRAConfig(targets=())).eval())
    tensors = {n: {k: v.detach().clone() for k, v in lora_parameters(singles[n]).items()} for n in ADAPTERS}
    ids = torch.randint(0, 50257, (3, 10), generator=torch.Generator().manual_seed(1))

    def check(names):
        with torch.inference_mode(), bank.rows(names):
            mixed = bank.model(ids)
        with torch.inference_mode():
            for i, name in enumerate(names):
                torch.testing.assert_close(mixed[i : i + 1], singles[name](ids[i : i + 1]), rtol=0, atol=1e-5)

    for name in ("last-block", "everything", "attn"):  # rank 8 first: the others reuse padded rows
        bank.add(name, ADAPTERS[name], tensors[name])
    bank.remove("last-block")
    assert bank.names == [None, None, "everything", "attn"]
    check(["attn", "everything", None])
    bank.add("again", ADAPTERS["attn"], tensors["attn"])  # into the freed slot 1
    assert bank.names == [None, "again", "everything", "attn"]
    singles["again"] = singles["attn"]
    try:
        check(["again", "everything", "attn"])
    finally:
        del singles["again"]
    bank.remove("everything")  # its modules (ffn, lm_head, embeddings) have no user left
    assert not any(p.startswith(("blocks.0.ffn", "lm_head", "token_embedding")) for p in bank.stacks)
    check(["attn", None, "attn"])
    hooked = sum(len(m._forward_hooks) for m in bank.model.modules())
    assert hooked == len(bank.stacks)
    for name in ("again", "attn"):
        bank.remove(name)
    assert bank.names == [None] and bank.stacks == {} and bank.nbytes == 0
    assert sum(len(m._forward_hooks) for m in bank.model.modules()) == 0
    with pytest.raises(ValueError, match="unknown adapter 'attn'"):
        bank.remove("attn")
    with torch.inference_mode():  # the plain base model again
        torch.testing.assert_close(bank.model(ids), singles[None](ids), rtol=0, atol=0)
