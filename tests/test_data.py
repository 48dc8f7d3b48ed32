"""Preparation of any text file, and the batches the trainer reads."""

import hashlib
import json

import numpy as np
import pytest
import torch

from lora_gpt2.data import prepare as prep
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
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"looks binary \(it holds NUL bytes, the first at offset 8\), not UTF-8 text"),
    (b"caf\xe9 au lait", r"is not UTF-8 text \(invalid byte at offset 3\)"),
])
def test_bad_text_files(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        prep.ensure_prepared(write(tmp_path, "bad.txt", content))


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match=r"data '.*nope' not found: give a text, JSONL or CSV file, or a folder"):
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
    from lora_gpt2.data import encoding

    monkeypatch.setattr(encoding, "CHUNK_CHARS", 97)
    assert encoding.encode_chunked(text).tolist() == whole


def test_train_batches_are_a_function_of_seed_and_step(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    batches = TrainBatches(tokens, batch_size=4, block_size=16, seed=3)
    x, y = batches.get(5).x, batches.get(5).y
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    assert torch.equal(batches.get(5).x, x)
    assert not torch.equal(batches.get(6).x, x)
    assert not torch.equal(TrainBatches(tokens, 4, 16, seed=4).get(5).x, x)


def test_ranks_draw_slices_of_the_single_process_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = TrainBatches(tokens, batch_size=6, block_size=8, seed=1).get(2, micro=1).x
    parts = [TrainBatches(tokens, 3, 8, seed=1, rank=r, world_size=2).get(2, micro=1).x for r in (0, 1)]
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


def _tree(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.slow
def test_read_only_dataset_folder_is_prepared_into_the_cache_and_used(tiny_checkpoint, tmp_path):
    import os
    import subprocess

    from helpers import cli_command, read_only, subprocess_env

    share = tmp_path / "share"
    share.mkdir()
    write(share, "input.txt", SAMPLE_TEXT)
    cache = tmp_path / "cache"
    env = subprocess_env(LORA_GPT2_CACHE=str(cache))
    before = _tree(share)
    train = ["train", "--model", tiny_checkpoint[0], "--data", share, "--targets", "qkv_projection", "--rank", "2",
             "--block-size", "16", "--batch-size", "2", "--max-steps", "1", "--dtype", "float32", "--device", "cpu"]
    for run in ("a", "b"):
        done = subprocess.run(read_only([share], cli_command(*train, "--out", tmp_path / run)), env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        if run == "a":
            [folder] = (cache / "data").iterdir()
            meta = json.loads((folder / "meta.json").read_text())
            stamp = (folder / "train.bin").stat().st_mtime_ns
    assert _tree(share) == before  # nothing written to the share, not even a temporary
    assert (folder / "train.bin").stat().st_mtime_ns == stamp  # the second run used the cache
    assert meta["text"] == str((share / "input.txt").resolve())
    assert meta["text_sha256"] == hashlib.sha256(SAMPLE_TEXT.encode()).hexdigest()
    ids = np.fromfile(folder / "train.bin", np.uint16).tolist() + np.fromfile(folder / "val.bin", np.uint16).tolist()
    assert tokenizer.decode(ids) == SAMPLE_TEXT

    # a share prepared beside its text is read from there, and eval reads it as well
    prep.ensure_prepared(share)
    before = _tree(share)
    done = subprocess.run(read_only([share], cli_command("eval", "--model", tiny_checkpoint[0], "--data", share,
                                                         "--adapter", tmp_path / "a", "--block-size", "16",
                                                         "--device", "cpu", "--json")),
                          env=subprocess_env(LORA_GPT2_CACHE=str(tmp_path / "unused")), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["adapter"]["loss"] > 0
    assert _tree(share) == before and not os.path.exists(tmp_path / "unused")


def test_read_only_folder_and_cache_is_one_line_naming_the_setting(tmp_path):
    import subprocess

    from helpers import cli_command, read_only, subprocess_env

    share, cache = tmp_path / "share", tmp_path / "cache"
    share.mkdir()
    cache.mkdir()
    write(share, "input.txt", SAMPLE_TEXT)
    done = subprocess.run(read_only([share, cache], cli_command("train", "--model", tmp_path / "no-model", "--data",
                                                                share, "--out", tmp_path / "run")),
                          env=subprocess_env(LORA_GPT2_CACHE=str(cache)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"lora-gpt2: error: {share} is read-only and the cache cannot take the token files either (")
    assert done.stderr.strip().endswith("set LORA_GPT2_CACHE to a writable folder")
    assert list(share.iterdir()) == [share / "input.txt"] and list(cache.iterdir()) == []
    assert not (tmp_path / "run").exists()  # the refused run left no folder behind


def _prepare_and_read(data, column, barrier, queue):
    """In a child process: prepare `data` read by `column` once every child is ready, and send back
    the token files this process then reads (train, val)."""
    from lora_gpt2.data import Options, ensure_prepared

    barrier.wait()
    p = ensure_prepared(data, Options(text_column=column))
    queue.put((column, p.train.read_bytes(), p.val.read_bytes()))


def test_two_processes_preparing_other_columns_at_once_each_read_their_own(tmp_path):
    """Preparing is keyed by what decides the tokens (content, kind, columns) and safe to race:
    processes choosing other CSV columns of one file at the same moment each end up with files
    identical to a clean preparation of their own choice, never the other's, never a mix."""
    import csv
    import multiprocessing

    from lora_gpt2.data import Options, ensure_prepared

    rows = [(f"alpha {i} " * 40, f"beta {i} " * 40) for i in range(400)]
    data = tmp_path / "shared" / "rows.csv"
    data.parent.mkdir()
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("a", "b"), *rows])
    clean = {}
    for column in "ab":
        alone = tmp_path / f"clean-{column}"
        alone.mkdir()
        (alone / "rows.csv").write_bytes(data.read_bytes())
        p = ensure_prepared(alone / "rows.csv", Options(text_column=column))
        clean[column] = (p.train.read_bytes(), p.val.read_bytes())
    assert clean["a"] != clean["b"]
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        for leftover in data.parent.iterdir():  # every attempt prepares afresh
            if leftover != data:
                leftover.unlink()
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        children = [ctx.Process(target=_prepare_and_read, args=(data, c, barrier, queue)) for c in "abab"]
        for child in children:
            child.start()
        results = [queue.get(timeout=120) for _ in children]
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        for column, train, val in results:
            assert (train, val) == clean[column], (attempt, column)
