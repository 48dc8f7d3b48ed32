"""The bundled tokenizer equals tiktoken's `gpt2` and transformers' GPT2TokenizerFast."""

import hashlib
import shutil

import pytest

from lora_gpt2 import tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "   leading and trailing   \t\n  ",
    "naïve café — “quotes” 日本語のテキスト 🤖🎉 émoji",
    "<|endoftext|> is just text here",
    "it's we'll they're I'd 12345 3.14159",
    "\n\n\n\r\n  \u00a0\u2003x",
]


def test_asset_hashes_match_what_tiktoken_expects():
    for name, expected in (("vocab.bpe", tokenizer.VOCAB_BPE_SHA256),
                           ("encoder.json", tokenizer.ENCODER_JSON_SHA256)):
        assert hashlib.sha256((tokenizer.ASSETS / name).read_bytes()).hexdigest() == expected


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("hf-tokenizer")  # the file names transformers looks for
    shutil.copy(tokenizer.ASSETS / "encoder.json", d / "vocab.json")
    shutil.copy(tokenizer.ASSETS / "vocab.bpe", d / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(d))


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_gpt2_tokenizer_fast(text, hf_tokenizer):
    ids = tokenizer.encode(text)
    expected = hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == expected
    assert tokenizer.decode(ids) == text


def test_endoftext_in_text_is_plain_characters():
    ids = tokenizer.encode("<|endoftext|>")
    assert tokenizer.EOT_ID not in ids and len(ids) > 1


def test_encodes_like_tiktoken_get_encoding(tmp_path, monkeypatch):
    """Seed tiktoken's cache with the bundled files (keyed by URL sha1), then compare offline."""
    import tiktoken
    import tiktoken.registry

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copy(tokenizer.ASSETS / name, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("gpt2")
    ours = tokenizer.get_encoding()
    assert ours.n_vocab == reference.n_vocab == 50257
    for text in TEXTS:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
