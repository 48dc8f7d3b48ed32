"""tiktoken's `gpt2` encoding, built offline from the BPE files bundled as package data."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
# The sha256 that tiktoken_ext.openai_public.gpt2() expects of the two files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
NAME = "gpt2"


@lru_cache(maxsize=1)
def get_encoding():
    """The GPT-2 `tiktoken.Encoding`, identical to `tiktoken.get_encoding("gpt2")`."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(ASSETS / "vocab.bpe"),
        encoder_json_file=str(ASSETS / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=NAME,
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


def encode(text: str) -> list[int]:
    """Encode plain text; `<|endoftext|>` in the text is ordinary characters, not the special token."""
    return get_encoding().encode_ordinary(text)


def encode_prompt(text: str) -> list[int]:
    """A prompt's tokens, as `generate` and `serve` read it: an empty prompt starts a new
    document (<|endoftext|>), so there is always a token to continue from."""
    return encode(text) or [EOT_ID]


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)
