"""llama.cpp itself runs the GGUF exports (through llama-cpp-python, which builds it from source):
its logits, greedy text and tokenizer against lora-gpt2's, for every weight type, and a base GGUF
plus a LoRA GGUF against the merged file.

llama.cpp's CPU GELU rounds its input to float16 and looks the result up in a float16 table
(GGML_GELU_FP16), so its float32 logits differ from exact arithmetic by more than float32
rounding, and a float32 rounding difference in a GELU input can move an output by one float16
step. The tests pin both sides of that: against lora-gpt2 with the same GELU (`ggml_gelu`) the
f32 file agrees as closely as that GELU lets any two float32 computations agree (`gelu_floor`:
the same reference with its GELU inputs jittered by float32 rounding); against lora-gpt2 as it
is, within the measured difference the README states.
"""

import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_gpt2 import tokenizer
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.inference.session import generate

from helpers import TINY, make_adapter, make_hf_model, save_hf_model

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'lora-gpt2[gguf]')")
# `.ci/run` builds llama-cpp-python and sets this, so there the tests fail instead of skipping
REQUIRED = os.environ.get("LORA_GPT2_REQUIRE_LLAMA_CPP") == "1"
try:
    import llama_cpp
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("llama.cpp is not installed (pip install llama-cpp-python builds it, about 10 minutes)",
                allow_module_level=True)

PROMPT = "ROMEO:\nWhat say you, Juliet? The 3rd hour comes, and with it the night.\n"
TOKENIZER_TEXTS = [PROMPT, "  two spaces,\ttabs\nand 'quotes' don't", "naïve café — 東京 🙂",
                   "1234567 + 89 = ?",
                   "<|endoftext|> as text", ""]
GREEDY_TOKENS = 30
_gelu = F.gelu


def ggml_gelu(x, approximate="none"):
    """GELU as llama.cpp's CPU backend computes it (ggml_vec_gelu_f32 with GGML_GELU_FP16)."""
    looked_up = _gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, looked_up))


def gelu_floor(model, ids) -> float:
    """How far `ggml_gelu`'s own logits move when its inputs move by float32 rounding (2e-7)."""
    reference = our_logits(model, ids, ggml_gelu)
    worst = 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)

        def jittered(x, approximate="none"):
            return ggml_gelu(x * (1 + 2e-7 * torch.randn(x.shape, generator=g)), approximate)

        worst = max(worst, float(np.abs(our_logits(model, ids, jittered) - reference).max()))
    return worst


def assert_exact_but_for_gelu(theirs, model, ids):
    """llama.cpp's f32 logits equal lora-gpt2's with llama.cpp's GELU, to that GELU's own noise."""
    error = float(np.abs(theirs - our_logits(model, ids, ggml_gelu)).max())
    assert error <= max(1e-4, 2 * gelu_floor(model, ids)), error


def llama(path, lora=None):
    # float32 K/V cache and no flash attention: llama.cpp's defaults keep K/V in float16
    return llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=256,
                           n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0, flash_attn=False)


def llama_logits(path, ids, lora=None) -> np.ndarray:
    model = llama(path, lora)
    model.eval(ids)
    return np.array(model.scores[:len(ids)], dtype=np.float32)


def llama_greedy(path, ids, n, lora=None) -> list[int]:
    model = llama(path, lora)
    model.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([out[-1]])
    return out


def our_logits(model, ids, gelu=None) -> np.ndarray:
    with mock.patch("lora_gpt2.model.gpt2.F.gelu", gelu or _gelu), torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def our_greedy(model, ids, n) -> list[int]:
    return list(generate(model, ids, SamplingConfig(max_new_tokens=n, temperature=0.0)))


def export(cli, *args):
    code, _, err = cli("export", *map(str, args))
    assert code == 0, err


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-runs")
    ckpt = tiny_checkpoint[0]
    return {"blocks": make_adapter(ckpt, root / "blocks", ("attn", "ffn")),
            "tied": make_adapter(ckpt, root / "tied", ("token_embedding", "lm_head"), seed=2, scale=0.2)}


def test_llama_cpps_tokenizer_in_the_file_encodes_as_tiktoken(runs, tmp_path, cli):
    out = tmp_path / "m.gguf"
    export(cli, "--format", "gguf", "--gguf-type", "f32", runs["blocks"][0], out)
    vocab = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        ours = tokenizer.encode(text)
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ours, text
        assert vocab.detokenize(ours).decode() == text


@pytest.mark.parametrize("name", ["blocks", "tied"])
def test_merged_f32_logits_and_greedy_text_equal_lora_gpt2s(runs, tmp_path, cli, name):
    run, model = runs[name]
    out = tmp_path / "m.gguf"
    export(cli, "--format", "gguf", "--gguf-type", "f32", run, out)
    ids = tokenizer.encode(PROMPT)
    theirs = llama_logits(out, ids)
    assert_exact_but_for_gelu(theirs, model, ids)
    # measured: 4.6e-4 (blocks), 2.3e-3 (tied; its logits span ±4.6)
    np.testing.assert_allclose(theirs, our_logits(model, ids), rtol=0, atol=4e-3)
    assert llama_greedy(out, ids, GREEDY_TOKENS) == our_greedy(model, ids, GREEDY_TOKENS)


# (type, greedy tokens that must agree, max logit difference from lora-gpt2's float32) on the
# "blocks" adapter; measured there: 9.8e-4, 8.7e-3, 2.2e-2, and all 30 greedy tokens equal
TYPES = [("f16", GREEDY_TOKENS, 2e-3), ("bf16", 20, 1.5e-2), ("q8_0", 10, 4e-2)]


@pytest.mark.parametrize("gguf_type,agree,tolerance", TYPES)
def test_each_weight_type_stays_within_its_measured_tolerance(runs, tmp_path, cli, gguf_type, agree, tolerance):
    run, model = runs["blocks"]
    out = tmp_path / f"{gguf_type}.gguf"
    export(cli, "--format", "gguf", "--gguf-type", gguf_type, run, out)
    ids = tokenizer.encode(PROMPT)
    np.testing.assert_allclose(llama_logits(out, ids), our_logits(model, ids), rtol=0, atol=tolerance)
    assert llama_greedy(out, ids, agree) == our_greedy(model, ids, agree)


@pytest.mark.parametrize("name", ["blocks", "tied"])
def test_base_plus_lora_gguf_equals_the_merged_gguf(runs, tmp_path, cli, name):
    run, model = runs[name]
    merged, base, lora = tmp_path / "m.gguf", tmp_path / "base.gguf", tmp_path / "lora.gguf"
    export(cli, "--format", "gguf", "--gguf-type", "f32", run, merged)
    export(cli, "--format", "gguf", "--base-only", "--gguf-type", "f32", run, base)
    export(cli, "--format", "gguf-lora", "--gguf-type", "f32", run, lora)
    ids = tokenizer.encode(PROMPT)
    with_lora = llama_logits(base, ids, lora)
    np.testing.assert_allclose(with_lora, llama_logits(merged, ids), rtol=0, atol=1e-4)  # measured 9e-6
    assert_exact_but_for_gelu(with_lora, model, ids)
    # and the adapter matters: the base alone answers differently
    assert np.abs(llama_logits(base, ids) - with_lora).max() > 1e-2


@pytest.mark.slow
def test_gpt2_small_shape_f32_logits_and_greedy_text(tmp_path, cli):
    shape = dict(TINY, n_layer=12, n_head=12, n_embd=768, n_positions=1024)
    checkpoint = save_hf_model(make_hf_model(**shape), tmp_path / "small")
    run, model = make_adapter(checkpoint, tmp_path / "run", ("attn", "ffn"), scale=0.02)
    out = tmp_path / "small.gguf"
    export(cli, "--format", "gguf", "--gguf-type", "f32", run, out)
    ids = tokenizer.encode(PROMPT)
    theirs = llama_logits(out, ids)
    # at this depth the float16 GELU table alone moves logits by ~2e-3 (gelu_floor measures it)
    assert_exact_but_for_gelu(theirs, model, ids)
    np.testing.assert_allclose(theirs, our_logits(model, ids), rtol=0, atol=5e-3)  # measured 3.3e-3
    assert llama_greedy(out, ids, GREEDY_TOKENS) == our_greedy(model, ids, GREEDY_TOKENS)
