"""Texts and conversations to GPT-2 token ids, as preparing needs them: long texts in pieces
cut where no token can span, many short texts on all cores, conversations by their template."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from .. import tokenizer
from ..errors import DataError

TOKEN_DTYPE = np.uint16
CHUNK_CHARS = 1 << 20
# A safe place to cut text for chunked encoding: "X\nY" with X, Y not whitespace. No GPT-2
# pre-token spans it, so encoding the pieces equals encoding the whole.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_NONE = np.zeros(0, dtype=TOKEN_DTYPE)


def encode_chunked(text: str) -> np.ndarray:
    """Token ids of `text`, encoded in ~1M-character pieces cut where tokens cannot span."""
    enc = tokenizer.get_encoding()
    parts, start = [], 0
    while start < len(text):
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            cut = _SAFE_CUT.search(text, end)
            end = cut.start() if cut else len(text)
        parts.append(np.asarray(enc.encode_ordinary(text[start:end]), dtype=TOKEN_DTYPE))
        start = end
    return np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)


def encode_batch(texts: list[str]) -> list[np.ndarray]:
    """Token ids (uint16 arrays: 2 bytes a token, not a Python int's 36) of many texts, in
    order, on all cores: tiktoken's encoder releases the GIL, and each thread takes one
    contiguous slice (a future per text, as `encode_ordinary_batch` makes, costs more than
    encoding a short text)."""
    encode = tokenizer.get_encoding().encode_ordinary

    def run(part: list[str]) -> list[np.ndarray]:
        return [np.array(encode(t), dtype=TOKEN_DTYPE) for t in part]

    threads = min(os.cpu_count() or 1, max(1, len(texts) // 256))
    if threads == 1:
        return run(texts)
    size = -(-len(texts) // threads)
    slices = [texts[i : i + size] for i in range(0, len(texts), size)]
    with ThreadPoolExecutor(threads) as pool:
        return [ids for part in pool.map(run, slices) for ids in part]


def encoded(prompted: bool, template, batch: list) -> Iterator[tuple]:
    """Each example's (prompt ids, completion ids), or a conversation's (none, ids, marks)."""
    if template is not None:
        for example in batch:
            try:
                ids, marks = template.encode(list(example.messages))
            except DataError as exc:
                raise DataError(f"{example.where}: {exc}") from None
            if len(ids) < 2:  # nothing to predict: a template that drops the messages
                raise DataError(f"{example.where}: the chat template renders this conversation as {len(ids)} "
                                "token(s); a conversation needs at least 2")
            yield _NONE, np.asarray(ids, dtype=TOKEN_DTYPE), marks
        return
    prompts = encode_batch([e.prompt for e in batch]) if prompted else [_NONE] * len(batch)
    yield from zip(prompts, encode_batch([e.completion for e in batch]))
