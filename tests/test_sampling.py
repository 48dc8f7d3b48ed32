"""Sampling rules of next_token: greedy, top-k, top-p, temperature, seeds."""

import pytest
import torch

from lora_gpt2.inference.sampling import SamplingConfig, next_token

LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])


def draws(cfg, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([next_token(LOGITS, cfg, g) for _ in range(n)]).flatten()


def test_temperature_zero_and_top_k_one_are_greedy():
    assert next_token(LOGITS, SamplingConfig(temperature=0), None).item() == 0
    assert set(draws(SamplingConfig(top_k=1)).tolist()) == {0}


def test_top_k_never_leaves_the_k_best():
    assert set(draws(SamplingConfig(top_k=3)).tolist()) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)[0]  # 0.63, 0.23, 0.086, ...
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert set(draws(SamplingConfig(top_p=0.7)).tolist()) == {0, 1}
    assert set(draws(SamplingConfig(top_p=0.5)).tolist()) == {0}  # the best token always stays


def test_same_seed_same_tokens_and_high_temperature_flattens():
    cfg = SamplingConfig(temperature=1.0)
    assert torch.equal(draws(cfg, seed=3), draws(cfg, seed=3))
    hot = draws(SamplingConfig(temperature=100.0), n=1200)
    assert (hot == 5).float().mean() > 0.1  # nearly uniform over 6 tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top-k must be >= 1, got 0"),
    (dict(top_p=0.0), r"top-p must be in \(0, 1\], got 0.0"),
    (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
    (dict(max_new_tokens=-1), "max-new-tokens must be >= 0, got -1"),
])
def test_invalid_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_a_vanishing_temperature_is_greedy_and_non_finite_logits_are_named():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])  # every positive logit overflows to inf at this temperature
    assert next_token(logits, SamplingConfig(temperature=1e-45), torch.Generator().manual_seed(0)).item() == 1
    with pytest.raises(ValueError, match="logits that are not finite"):
        next_token(torch.tensor([[1.0, float("nan")]]), SamplingConfig(), None)


def nucleus_by_hand(logits: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of best tokens whose mass reaches top_p, in float64."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.append(token)
        mass += probs[token].item()
    return set(kept)


def zipf_logits(rows: int, seed: int) -> torch.Tensor:
    """A language model's kind of distribution: probability ~ rank^-1.5, tokens shuffled."""
    g = torch.Generator().manual_seed(seed)
    ranked = -1.5 * torch.log(torch.arange(1, 50258, dtype=torch.float32))
    return torch.stack([ranked[torch.randperm(50257, generator=g)] for _ in range(rows)])


@pytest.mark.parametrize("peaked", [False, True])  # flat: the nucleus is wider than the probe; peaked: inside it
def test_top_p_without_a_full_sort_keeps_the_same_tokens(monkeypatch, peaked):
    import lora_gpt2.inference.sampling as gen

    flat = torch.randn(3, 50257, generator=torch.Generator().manual_seed(1)) * 0.5
    logits = zipf_logits(3, seed=1) if peaked else flat
    cfg = SamplingConfig(temperature=1.0, top_p=0.9)
    probed = gen._candidates(logits, cfg)
    probe = gen.NUCLEUS_PROBE
    monkeypatch.setattr(gen, "NUCLEUS_PROBE", 10**6)  # always sort the whole vocabulary
    full = gen._candidates(logits, cfg)
    assert torch.equal(probed[0], full[0]) and torch.equal(probed[1], full[1])
    for row in range(3):
        kept = {int(t) for t, p in zip(full[1][row], full[0][row]) if p > 0}
        by_hand = nucleus_by_hand(logits[row], 0.9)
        assert len(kept ^ by_hand) <= 1  # float32 against float64 at the boundary, at most one token
    assert (probed[1].size(1) > probe) == (not peaked)


def test_a_peaked_top_p_never_sorts_the_vocabulary(monkeypatch):
    logits = zipf_logits(2, seed=2)
    monkeypatch.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted the whole vocabulary"))
    g = torch.Generator().manual_seed(0)
    tokens = next_token(logits, SamplingConfig(temperature=1.0, top_p=0.9), g)
    assert tokens.shape == (2,)
