"""The batch's KV cache layouts (inference/kv.py): the paged pool attends exactly as a fresh
forward over each row's whole history, holds blocks for the tokens held and no more, hands a
block out clean, and decodes what the per-row layout decodes."""

import math

import pytest
import torch

from lora_gpt2 import load_pretrained
from lora_gpt2.config import LoRAConfig
from lora_gpt2.inference import kv
from lora_gpt2.inference.decoding import Decoder
from lora_gpt2.inference.sampling import SamplingConfig

from helpers import make_hf_model, save_hf_model

BLOCK = 4  # small blocks: every prompt below crosses several boundaries, and rows need new ones mid-run
PROMPTS = [[5, 9, 2], [7] * 9, list(range(30, 47)), [11, 12, 13, 14]]  # 3, 9, 17 and 4 (one full block) tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf_model(make_hf_model(seed=3), tmp_path_factory.mktemp("kv-base"))
    return load_pretrained(path, lora=LoRAConfig(targets=())).eval()


def paged(model, block_size=BLOCK) -> Decoder:
    decoder = Decoder(model, max_batch=8)
    decoder.kv = kv.PagedCache(model, block_size)
    return decoder


@pytest.mark.parametrize("layout, gather_bytes", [("paged", kv.GATHER_BYTES), ("paged", 1), ("rows", 0)],
                         ids=["paged-one-call", "paged-a-call-per-row", "rows"])
def test_every_step_of_a_batch_equals_a_fresh_forward_over_each_rows_history(model, layout, gather_bytes, monkeypatch):
    """Rows of different lengths decode in one batch: each step's logits are those of the plain
    model over the row's whole history, recomputed without any cache (paged: attended to in one
    call, and in chunks of one row)."""
    monkeypatch.setattr(kv, "GATHER_BYTES", gather_bytes)
    decoder = paged(model) if layout == "paged" else Decoder(model, max_batch=8, kv_layout=layout)
    cfg = SamplingConfig(max_new_tokens=9, temperature=0)
    rows = [decoder.submit(p, None, cfg) for p in PROMPTS]
    checked = 0
    while decoder.busy:
        decoder.step()
        for s in decoder.active:
            with torch.inference_mode():
                fresh = model(torch.tensor([s.prompt + s.tokens]))[:, -1]
            torch.testing.assert_close(s.logits, fresh, rtol=0, atol=2e-5)
            checked += 1
    assert checked >= 30 and all(len(s.tokens) == 9 for s in rows)


def test_the_pool_holds_a_block_per_block_size_tokens_held_and_gives_them_back(model):
    decoder = paged(model)
    cache = decoder.kv
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    rows = [decoder.submit(p, None, cfg) for p in PROMPTS]
    for step in range(1, 6):
        decoder.step()  # (the first: the prompts' prefill); a token is drawn and cached
        held = [len(p) + step for p in PROMPTS]
        if step == 1:  # the 4-token prompt filled its block: its first token took a second one
            assert cache.blocks_in_use == 1 + 3 + 5 + 2
        assert cache.tokens == sum(held)
        assert cache.blocks_in_use == sum(math.ceil(n / BLOCK) for n in held), step
        assert [len(s.cache.ids) for s in rows] == [math.ceil(n / BLOCK) for n in held]
    assert cache.nbytes == 2 * model.config.n_layer * cache.blocks * BLOCK * model.config.n_embd * 4
    decoder.step()  # the 6th token ends every row: no forward, and every block goes back
    assert not decoder.busy and cache.blocks_in_use == cache.tokens == cache.blocks == cache.nbytes == 0
    assert cache.peak_blocks == sum(math.ceil((len(p) + 5) / BLOCK) for p in PROMPTS)


def test_a_cancelled_sequence_frees_its_blocks_at_once(model):
    decoder = paged(model)
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    a, b = decoder.submit(PROMPTS[2], None, cfg), decoder.submit(PROMPTS[0], None, cfg)
    decoder.step()
    decoder.step()
    decoder.cancel(a)
    assert a.cache is None and decoder.kv.blocks_in_use == math.ceil((len(PROMPTS[0]) + 2) / BLOCK)
    assert decoder.kv.tokens == len(PROMPTS[0]) + 2


def test_a_reused_block_never_carries_its_last_owners_numbers(model):
    """Every free position in the pool is spoiled with NaN (what a sequence whose adapter overflowed
    leaves behind): the next sequences, whose masked positions land on them, decode exactly."""
    cfg = SamplingConfig(max_new_tokens=7, temperature=0)
    clean = paged(model)
    expected = [clean.submit(p, None, cfg) for p in PROMPTS]
    while clean.busy:
        clean.step()
    decoder = paged(model)
    first = decoder.submit(list(range(60, 100)), None, SamplingConfig(max_new_tokens=3, temperature=0))
    keep = decoder.submit([1], None, SamplingConfig(max_new_tokens=50, temperature=0))  # keeps the pool alive
    decoder.step()
    decoder.step()
    decoder.cancel(first)
    with torch.inference_mode():
        for pool in decoder.kv.keys + decoder.kv.values:
            pool[torch.tensor(decoder.kv.free)] = float("nan")
    rows = [decoder.submit(p, None, cfg) for p in PROMPTS]
    while any(not s.done for s in rows):
        decoder.step()
    decoder.cancel(keep)
    assert [s.tokens for s in rows] == [s.tokens for s in expected]
    assert all(s.finish_reason == "length" for s in rows)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_paged_and_the_per_row_layouts_decode_the_same_texts(model, temperature):
    """The same requests, joining at different steps, greedy and seeded, through both layouts."""
    results = {}
    for name in kv.LAYOUTS:
        decoder = Decoder(model, max_batch=3, kv_layout=name)
        cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=40)
        rows = [decoder.submit(p, None, cfg, seed=100 + i) for i, p in enumerate(PROMPTS[:2])]
        decoder.step()
        decoder.step()
        rows += [decoder.submit(p, None, cfg, seed=200 + i) for i, p in enumerate(PROMPTS[2:])]  # 1 waits
        while decoder.busy:
            decoder.step()
        results[name] = [(s.tokens, s.finish_reason) for s in rows]
    assert results["paged"] == results["rows"]
    assert len({tuple(t) for t, _ in results["paged"]}) == len(PROMPTS)


def test_a_sliding_sequence_refills_its_blocks_from_its_window(model):
    """`generate` past the context: the window's prefill replaces the sequence's blocks."""
    from lora_gpt2.inference.decoding import window_length

    context = model.config.n_positions
    decoder = paged(model)
    cfg = SamplingConfig(max_new_tokens=context + 5, temperature=0)
    s = decoder.submit([3] * (context - 2), None, cfg, slide=True)
    while len(s.tokens) < 4:
        decoder.step()
    assert decoder.kv.tokens == window_length(context) + len(s.tokens) - 3
    assert decoder.kv.blocks_in_use == math.ceil(decoder.kv.tokens / BLOCK)
    assert kv._PagedStep(decoder.kv, [s.cache]).alone is not None  # one row, its blocks in order: read in place
    with torch.inference_mode():
        fresh = model(torch.tensor([(s.prompt + s.tokens)[-decoder.kv.tokens:]]))[:, -1]
    torch.testing.assert_close(s.logits, fresh, rtol=0, atol=2e-5)


def test_an_unknown_layout_is_named():
    with pytest.raises(ValueError, match="unknown KV cache layout 'flat'; choose one of: paged, rows"):
        kv.layout("flat", None)


def test_a_prompt_kept_in_scattered_blocks_decodes_exactly(model):
    """Blocks freed between other sequences' blocks: a new prompt lands in runs that are not
    consecutive, and every step still equals a fresh forward over its history."""
    decoder = paged(model)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    a, b = decoder.submit([5] * 5, None, cfg), decoder.submit([6] * 5, None, cfg)
    for _ in range(4):
        decoder.step()  # a and b take their third blocks one after the other
    assert a.cache.ids == [0, 1, 4] and b.cache.ids == [2, 3, 5]
    decoder.cancel(a)
    c = decoder.submit(list(range(70, 82)), None, cfg)  # 12 positions: 3 blocks, handed out as 0, 1, 4
    decoder.step()
    assert c.cache.ids[:3] == [0, 1, 4]
    while not c.done:
        with torch.inference_mode():
            fresh = model(torch.tensor([c.prompt + c.tokens]))[:, -1]
        torch.testing.assert_close(c.logits, fresh, rtol=0, atol=2e-5)
        decoder.step()
