"""int8 weight-only decoding (`--quantize int8`, inference/quantize.py): the weights are the
symmetric per-channel int8 of the (folded) float weights, the products equal plain PyTorch maths
on them, generate / eval / serve use them, and a CPU or build without the kernel is refused."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_gpt2 import load_pretrained
from lora_gpt2.adapters.lora import AdapterLayer, FrozenLinear
from lora_gpt2.config import LoRAConfig
from lora_gpt2.inference import quantize
from lora_gpt2.inference.layouts import DecodeLayout
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.inference.session import GenerationSession
from lora_gpt2.model.gpt2 import KVCache

from helpers import make_hf_model, randomize_adapters, save_hf_model


def int8_of(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maths written out: per output row, s = max|w| / 127, q = round(w / s)."""
    s = w.abs().amax(dim=1) / 127
    s[s == 0] = 1
    return torch.round(w / s[:, None]).clamp(-127, 127), s


def dequantized(w: torch.Tensor) -> torch.Tensor:
    q, s = int8_of(w.detach().float())
    return q * s[:, None]


@pytest.mark.parametrize("chunk", [quantize.QUANTIZE_ROWS, 7])  # one slice, and six of 7 rows and one of 5
def test_int8_weights_are_each_rows_127_levels_of_its_largest_value(chunk, monkeypatch):
    monkeypatch.setattr(quantize, "QUANTIZE_ROWS", chunk)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    w[5, 7] = -9.0  # an outlier sets its row's scale alone
    packed = quantize.Int8Weight.of(w)
    assert packed.values.dtype == torch.int8 and packed.values.abs().max() == 127
    nonzero = [i for i in range(40) if i != 3]
    assert (packed.values[nonzero].abs().amax(dim=1) == 127).all()
    assert packed.values[5, 7] == -127 and torch.equal(packed.values[3], torch.zeros(64, dtype=torch.int8))
    torch.testing.assert_close(packed.scale, w.abs().amax(dim=1).where(w.abs().amax(dim=1) > 0, 127.0) / 127)
    error = (packed.dequantized() - w).abs()
    assert (error <= packed.scale[:, None] / 2 + 1e-7).all()  # rounding to the nearest level
    assert torch.equal(packed.dequantized()[3], torch.zeros(64))
    assert packed.nbytes == 40 * 64 + 40 * 4 + 40 * 2


@pytest.mark.parametrize("rows", [1, 5, 60])
@pytest.mark.parametrize("width", [32, 33, 768])
def test_the_int8_product_equals_plain_pytorch_maths(rows, width):
    """Up to INT8_ROWS rows of a width the kernel takes: bf16 activations times the int8 values,
    summed, rounded to bf16, times the float scale. Otherwise (a prefill, a width of 33, which the
    kernel gets wrong) the dequantized weight in float32, to rounding."""
    g = torch.Generator().manual_seed(rows * width)
    w, b, x = torch.randn(50, width, generator=g), torch.randn(50, generator=g), torch.randn(rows, width, generator=g)
    q, s = int8_of(w)
    out = quantize.int8_linear(x, quantize.Int8Weight.of(w), b)
    if rows <= quantize.INT8_ROWS and width % 16 == 0:
        expected = (x.bfloat16().float() @ q.T).bfloat16().float() * s + b
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-5)
    else:
        torch.testing.assert_close(out, F.linear(x, q * s[:, None], b), rtol=0, atol=1e-4)
    exact = F.linear(x, w, b)
    assert 1e-4 < ((out - exact).norm() / exact.norm()).item() < 2e-2  # int8's error: present, and small


@pytest.fixture
def adapted(tmp_path):
    path = save_hf_model(make_hf_model(seed=5), tmp_path / "m")
    model = load_pretrained(path, lora=LoRAConfig(targets=("attn", "ffn", "lm_head"), r=4, alpha=8.0))
    return randomize_adapters(model, seed=1, scale=0.05).eval()


def quantised_reference(model: nn.Module, fold: bool) -> nn.Module:
    """A copy of `model` whose linear weights are their int8 values times their scales: with the
    adapter merged first (fold), or beside it in float (not fold)."""
    ref = copy.deepcopy(model)
    if fold:
        ref.merge()
    for module in ref.modules():
        if isinstance(module, FrozenLinear):  # a new tensor: a tied embedding keeps its float weight
            module.weight = nn.Parameter(dequantized(module.weight).to(module.weight.dtype), requires_grad=False)
    return ref


def one_step_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of decoding ids[:, -1] after a prefill of the rest (a one-row product each)."""
    cache = KVCache.empty(model.config, ids.size(0), model.frozen_dtype(), "cpu", ids.size(1))
    model(ids[:, :-1], cache)
    return model(ids[:, -1:], cache, at=-1)


@pytest.mark.parametrize("fold", [True, False])
def test_an_int8_layout_computes_the_quantised_model(adapted, fold):
    ids = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(2))
    ref = quantised_reference(adapted, fold)
    with torch.inference_mode():
        plain, expected = adapted(ids), ref(ids)
        plain_step, expected_step = one_step_logits(adapted, ids), one_step_logits(ref, ids)
        with DecodeLayout(adapted, "int8", fold=fold) as layout:
            assert len(layout.copies) == 2 * 4 + 1
            assert all((c.update is None) == fold for m, c in layout.copies.items() if isinstance(m, AdapterLayer))
            prefill = adapted(ids)  # 60 rows per product: the dequantized weights
            step = one_step_logits(adapted, ids)  # 1 row: the int8 kernel, bf16 activations
    torch.testing.assert_close(prefill, expected, rtol=0, atol=5e-5)
    int8_error = (step - expected_step).norm() / expected_step.norm()
    float_gap = (plain_step - expected_step).norm() / expected_step.norm()
    assert int8_error < 1e-2 and int8_error < float_gap / 2, (int8_error, float_gap)  # it is the int8 model
    assert (prefill - plain).abs().max() > 1e-3


def test_a_bfloat16_model_stays_bfloat16_on_int8_weights(adapted):
    model = copy.deepcopy(adapted).bfloat16()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        expected = one_step_logits(quantised_reference(model, fold=True), ids).float()
        with DecodeLayout(model, "int8"):
            step = one_step_logits(model, ids)
    assert step.dtype == torch.bfloat16
    assert ((step.float() - expected).norm() / expected.norm()).item() < 2e-2


def test_an_int8_layout_leaves_nothing_on_the_model(adapted):
    ids = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(6))
    before = {name: (sorted(vars(m)), dict(m._forward_hooks)) for name, m in adapted.named_modules()}
    with torch.inference_mode():
        plain = adapted(ids)
        session = GenerationSession(adapted, quantize="int8")
        assert session.layout.describe() == {"format": "int8", "layers": 9, "bytes": sum(
            m.weight.numel() + m.out_features * 6 for m in session.layout.copies)}
        assert not torch.equal(adapted(ids), plain)
        session.close()
        assert {name: (sorted(vars(m)), dict(m._forward_hooks)) for name, m in adapted.named_modules()} == before
        assert torch.equal(adapted(ids), plain)


def test_a_missing_kernel_and_a_dtype_it_cannot_take_are_refused(adapted, monkeypatch):
    with pytest.raises(ValueError, match=r"^--quantize int8 decodes float32 or bfloat16 models, got float16$"):
        DecodeLayout(copy.deepcopy(adapted).half(), "int8").install()

    def missing(*args):
        raise NotImplementedError("Could not run 'aten::_weight_int8pack_mm' with arguments from the 'CPU' backend")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", missing)
    layout = DecodeLayout(adapted, "int8")
    with pytest.raises(ValueError, match=r"^--quantize int8: PyTorch's int8 weight-only kernel does not run on "
                                         r"cpu \(Could not run 'aten::_weight_int8pack_mm'"):
        layout.install()
    assert not layout.copies and "forward" not in vars(adapted.lm_head)  # nothing installed
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    with pytest.raises(ValueError, match=r"needs torch._weight_int8pack_mm, which PyTorch .* lacks"):
        layout.install()
    with pytest.raises(ValueError, match=r"^--quantize must be one of none, int8; got 'int4'$"):
        DecodeLayout(adapted, "int4")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_hf_model(make_hf_model(seed=11), tmp_path_factory.mktemp("q-base"))


def test_generate_and_eval_quantize_int8_from_the_command_line(tiny_base, text_data, cli, monkeypatch):
    code, out, err = cli("generate", "ROMEO:", "--model", tiny_base, "--temperature", "0", "--max-new-tokens", "24",
                         "--quantize", "int8", "--json", "--device", "cpu")
    assert code == 0, err
    net = load_pretrained(tiny_base, lora=None).eval()
    with GenerationSession(net, quantize="int8") as session:
        expected = session.stream("ROMEO:", SamplingConfig(max_new_tokens=24, temperature=0))
        text = "".join(expected)
    assert json.loads(out)["completion"] == text and json.loads(out)["tokens"] == 24

    code, out, err = cli("eval", "--model", tiny_base, "--data", text_data, "--block-size", "32", "--batch-size", "4",
                         "--eval-batches", "2", "--quantize", "int8", "--json", "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    code, plain, err = cli("eval", "--model", tiny_base, "--data", text_data, "--block-size", "32", "--batch-size",
                           "4", "--eval-batches", "2", "--json", "--device", "cpu", "--dtype", "float32")
    from lora_gpt2.training.evaluation import compare, resolve_settings
    settings = resolve_settings({}, net.config.n_positions, data=str(text_data), block_size=32, batch_size=4,
                                eval_batches=2)
    expected = compare(quantised_reference(net, fold=False), settings, with_adapter=False).base_loss
    assert json.loads(out)["base"]["loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(json.loads(plain)["base"]["loss"] - expected) > 1e-5  # the float model's is another loss

    for command in ("generate", "eval", "chat"):
        code, _, err = cli(command, *(["hi"] if command == "generate" else []), "--model", tiny_base,
                           "--quantize", "int4", input_text="hi\n")
        assert code == 1 and err.strip() == "lora-gpt2: error: --quantize must be one of none, int8; got 'int4'"
    monkeypatch.setattr(torch, "_weight_int8pack_mm", None)
    code, _, err = cli("generate", "hi", "--model", tiny_base, "--quantize", "int8", "--device", "cpu")
    assert code == 1 and err.strip().splitlines()[-1].startswith(
        "lora-gpt2: error: --quantize int8 needs torch._weight_int8pack_mm, which PyTorch")


def test_a_bank_over_int8_weights_adds_each_rows_float_update(tmp_path):
    """serve --quantize int8: the base model's weights are int8 and each row's adapter is added in
    float, as an unfolded int8 layout computes it."""
    from lora_gpt2.adapters.lora import lora_parameters
    from lora_gpt2.inference.bank import AdapterBank

    base = save_hf_model(make_hf_model(seed=3), tmp_path / "base")
    cfg = LoRAConfig(targets=("attn", "ffn"), r=4)
    adapter = randomize_adapters(load_pretrained(base, lora=cfg), seed=1, scale=0.05).eval()
    bank = AdapterBank(load_pretrained(base, lora=LoRAConfig(targets=())).eval())
    bank.add("a", cfg, {k: v.detach() for k, v in lora_parameters(adapter).items()})
    ids = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), DecodeLayout(bank.model, "int8"), bank.rows(["a", None]):
        got = bank.model(ids)
    with torch.inference_mode():
        expected_a = quantised_reference(adapter, fold=False)(ids[:1])
        with adapter.lora_disabled():
            expected_base = quantised_reference(adapter, fold=False)(ids[1:])
    torch.testing.assert_close(got[:1], expected_a, rtol=0, atol=5e-5)
    torch.testing.assert_close(got[1:], expected_base, rtol=0, atol=5e-5)


def test_serve_quantize_int8_serves_the_int8_base_model(tiny_base, tmp_path):
    import httpx

    from test_serve import start_serving

    (tmp_path / "none").mkdir()
    proc, url = start_serving(tiny_base, tmp_path / "none", "--quantize", "int8")
    try:
        weights = httpx.get(url + "/health", timeout=10).json()["weights"]
        assert weights["format"] == "int8" and weights["layers"] == 2 * 4 + 1
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "q-base0", "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    net = load_pretrained(tiny_base, lora=LoRAConfig(targets=())).eval()
    with GenerationSession(net, quantize="int8") as session:
        assert r.json()["choices"][0]["text"] == "".join(
            session.stream("ROMEO:", SamplingConfig(max_new_tokens=16, temperature=0)))
