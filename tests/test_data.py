"""Preparation of any text file, and the batches the trainer reads."""

import json

import numpy as np
import pytest
import torch

from lora_gpt2 import prepare as prep
from lora_gpt2 import tokenizer
from lora_gpt2.data import TrainBatches, eval_windows, open_tokens
from lora_gpt2.errors import DataError

from helpers import SAMPLE_TEXT


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_any_text_file_is_prepared_beside_it_with_matching_counts(tmp_path):
    text = write(tmp_path, "story.txt", SAMPLE_TEXT)
    p = prep.ensure_prepared(text)
    assert (p.train.name, p.val.name, p.meta.name) == ("story.train.bin", "story.val.bin", "story.meta.json")
    meta = json.loads(p.meta.read_text())
    assert meta["train_tokens"] * 2 == p.train.stat().st_size
    assert meta["val_tokens"] * 2 == p.val.stat().st_size
    assert meta["tokenizer"] == "gpt2" and meta["split"]["val_fraction"] == 0.1
    ids = np.fromfile(p.train, np.uint16).tolist() + np.fromfile(p.val, np.uint16).tolist()
    assert tokenizer.decode(ids) == SAMPLE_TEXT


def test_directory_with_input_txt_uses_nanogpt_names(tmp_path):
    write(tmp_path, "input.txt", SAMPLE_TEXT)
    p = prep.ensure_prepared(tmp_path)
    assert (p.train, p.val, p.meta) == (tmp_path / "train.bin", tmp_path / "val.bin", tmp_path / "meta.json")


def test_unchanged_text_is_not_prepared_again_and_changed_text_is(tmp_path):
    text = write(tmp_path, "input.txt", SAMPLE_TEXT)
    first = prep.ensure_prepared(text)
    stamp = first.train.stat().st_mtime_ns
    assert prep.ensure_prepared(text).train.stat().st_mtime_ns == stamp
    text.write_text(SAMPLE_TEXT + "EXTRA LINES\n" * 50)
    again = prep.ensure_prepared(text)
    assert again.train_tokens + again.val_tokens > first.train_tokens + first.val_tokens
    assert tokenizer.decode(np.fromfile(again.val, np.uint16).tolist()).endswith("EXTRA LINES\n")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"looks binary \(it holds NUL bytes\), not UTF-8 text"),
    (b"caf\xe9 au lait", r"is not UTF-8 text \(invalid byte at offset 3\)"),
])
def test_bad_text_files(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        prep.ensure_prepared(write(tmp_path, "bad.txt", content))


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match=r"data '.*nope' not found: give a text file or a folder holding input.txt"):
        prep.ensure_prepared(tmp_path / "nope")


def test_bins_that_disagree_with_meta_are_detected(tmp_path):
    text = write(tmp_path, "input.txt", SAMPLE_TEXT)
    p = prep.ensure_prepared(text)
    p.val.write_bytes(p.val.read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"val.bin holds {p.val_tokens - 10} tokens .* meta.json says {p.val_tokens}"):
        prep.ensure_prepared(text)


def test_chunked_encoding_equals_whole_encoding(monkeypatch):
    text = SAMPLE_TEXT * 3 + "  trailing \n\n  spaces\n x"
    whole = tokenizer.encode(text)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 97)
    assert prep.encode_chunked(text).tolist() == whole


def test_train_batches_are_a_function_of_seed_and_step(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    batches = TrainBatches(tokens, batch_size=4, block_size=16, seed=3)
    x, y = batches.get(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    assert torch.equal(batches.get(5)[0], x)
    assert not torch.equal(batches.get(6)[0], x)
    assert not torch.equal(TrainBatches(tokens, 4, 16, seed=4).get(5)[0], x)


def test_ranks_draw_slices_of_the_single_process_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = TrainBatches(tokens, batch_size=6, block_size=8, seed=1).get(2, micro=1)[0]
    parts = [TrainBatches(tokens, 3, 8, seed=1, rank=r, world_size=2).get(2, micro=1)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_eval_windows_are_deterministic_and_cover_the_split():
    tokens = np.arange(1000, dtype=np.uint16)
    first = eval_windows(tokens, block_size=50, batch_size=4, max_batches=3)
    again = eval_windows(tokens, block_size=50, batch_size=4, max_batches=3)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts[0] == 0 and starts[-1] == 1000 - 51


def test_val_split_too_short_says_how_many_tokens():
    with pytest.raises(DataError, match="val split has 40 tokens; one evaluation window at block size 64 needs 65"):
        eval_windows(np.zeros(40, np.uint16), block_size=64, batch_size=2, max_batches=1)


def test_odd_sized_bin_is_refused(tmp_path):
    path = write(tmp_path, "x.bin", b"\x00\x01\x02")
    with pytest.raises(DataError, match="has 3 bytes, not a whole number of uint16 tokens"):
        open_tokens(path)
