"""--data beyond one text file: folders of documents, JSONL and CSV, prompt/completion with the
prompt masked out of the loss, and every error such data can hold."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_gpt2 import tokenizer
from lora_gpt2.data import ensure_prepared, example_rows, open_index, open_tokens
from lora_gpt2.data import prepare as prep
from lora_gpt2.errors import DataError

EOT = tokenizer.EOT_ID
PAIRS = [{"prompt": f"Q{i}: what is {i} and {i}?\n", "completion": f" It is {2 * i}." + " more" * (i % 5)}
         for i in range(40)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows_of(prepared, split):
    """(tokens of each example, its prompt length) read back from the prepared files."""
    tokens, index = open_tokens(prepared.tokens_path(split)), open_index(prepared.index_path(split))
    return [(tokens[s : s + n].tolist(), p) for s, p, n in index]


def test_prompt_completion_jsonl_is_prompt_then_completion_then_eot_with_the_prompt_length(tmp_path):
    p = ensure_prepared(write_jsonl(tmp_path / "qa.jsonl", PAIRS))
    assert (p.layout, p.kind) == ("examples", "prompt/completion")
    assert (p.examples("train"), p.examples("val")) == (36, 4)
    seen = rows_of(p, "train") + rows_of(p, "val")
    expected = {tuple(tokenizer.encode(r["prompt"]) + tokenizer.encode(r["completion"]) + [EOT]):
                len(tokenizer.encode(r["prompt"])) for r in PAIRS}
    assert {tuple(ids): n for ids, n in seen} == expected
    meta = json.loads(p.meta.read_text())
    assert meta["split"] == {"unit": "examples", "val_fraction": 0.1, "seed": 1337,
                             "shuffle": "numpy.random.default_rng(seed).permutation"}
    # the split is the recorded seeded shuffle
    val = set(np.random.default_rng(1337).permutation(40)[:4].tolist())
    val_rows = [tuple(tokenizer.encode(PAIRS[i]["prompt"]) + tokenizer.encode(PAIRS[i]["completion"]) + [EOT])
                for i in sorted(val)]
    assert [tuple(ids) for ids, _ in rows_of(p, "val")] == val_rows
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(k) for k in expected)


def test_text_jsonl_and_csv_give_the_same_examples(tmp_path):
    texts = [f"Document {i}: " + "words " * (i % 7) for i in range(30)]
    a = ensure_prepared(write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)]))
    b = ensure_prepared(write_csv(tmp_path / "b.csv", ["id", "text"], list(enumerate(texts))))
    assert a.kind == b.kind == "examples"
    for split in ("train", "val"):
        assert rows_of(a, split) == rows_of(b, split)
        assert all(n == 0 and ids[-1] == EOT for ids, n in rows_of(a, split))
    c = ensure_prepared(write_csv(tmp_path / "c.csv", ["body"], [[t] for t in texts]),
                        prep.Options(text_column="body"))
    assert rows_of(c, "train") == rows_of(a, "train")


def test_csv_prompt_completion_by_default_and_by_named_columns(tmp_path):
    rows = [[r["prompt"], r["completion"]] for r in PAIRS]
    jsonl = ensure_prepared(write_jsonl(tmp_path / "qa.jsonl", PAIRS))
    default = ensure_prepared(write_csv(tmp_path / "d.csv", ["prompt", "completion"], rows))
    named = ensure_prepared(write_csv(tmp_path / "n.csv", ["q", "a"], rows),
                            prep.Options(prompt_column="q", completion_column="a"))
    assert default.kind == named.kind == "prompt/completion"
    assert rows_of(default, "train") == rows_of(named, "train") == rows_of(jsonl, "train")


def test_a_folder_with_train_and_valid_jsonl_uses_its_own_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:30])
    write_jsonl(tmp_path / "valid.jsonl", PAIRS[30:])
    write_jsonl(tmp_path / "test.jsonl", PAIRS[:2])
    p = ensure_prepared(tmp_path)
    assert (p.examples("train"), p.examples("val")) == (30, 10)
    assert [ids for ids, _ in rows_of(p, "val")] == [
        tokenizer.encode(r["prompt"]) + tokenizer.encode(r["completion"]) + [EOT] for r in PAIRS[30:]]
    assert json.loads(p.meta.read_text())["split"] == {"unit": "files", "val": "valid.jsonl"}


def test_a_folder_of_documents_is_joined_by_eot_and_split_by_documents(tmp_path):
    docs = {f"poems/{i:02d}.txt" if i % 2 else f"notes/{i:02d}.md": f"Poem number {i}.\nA line.\n" for i in range(20)}
    for name, text in docs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "poems" / "empty.txt").write_text("")  # no document
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")  # not text: ignored
    p = ensure_prepared(tmp_path)
    assert (p.layout, p.kind, p.examples("train"), p.examples("val")) == ("stream", "documents", 18, 2)
    ordered = [docs[n] for n in sorted(docs)]  # sorted by path
    val_ids = set(np.random.default_rng(1337).permutation(20)[:2].tolist())
    for split, members in (("train", [d for i, d in enumerate(ordered) if i not in val_ids]),
                           ("val", [d for i, d in enumerate(ordered) if i in val_ids])):
        ids = open_tokens(p.tokens_path(split)).tolist()
        expected = []
        for i, doc in enumerate(members):
            expected += ([EOT] if i else []) + tokenizer.encode(doc)
        assert ids == expected


def test_a_folder_holding_one_text_file_means_that_file(tmp_path):
    (tmp_path / "input.txt").write_text("Hello there.\n" * 200)
    p = ensure_prepared(tmp_path)
    assert (p.kind, p.train, p.val) == ("text", tmp_path / "train.bin", tmp_path / "val.bin")
    assert json.loads(p.meta.read_text())["split"]["unit"] == "characters"
    other = tmp_path / "other"
    other.mkdir()
    (other / "story.md").write_text("Once upon a time.\n" * 100)
    q = ensure_prepared(other)
    assert (q.kind, q.train) == ("text", other / "story.train.bin")


def test_a_changed_source_or_other_columns_prepare_again(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "other"], [[f"a{i}", f"b{i}"] for i in range(20)])
    first = ensure_prepared(path)
    stamp = first.train.stat().st_mtime_ns
    assert ensure_prepared(path).train.stat().st_mtime_ns == stamp
    other = ensure_prepared(path, prep.Options(text_column="other"))
    assert tokenizer.decode(open_tokens(other.train).tolist()).count("b") == other.examples("train")
    write_csv(path, ["text", "other"], [[f"c{i}", f"b{i}"] for i in range(20)])
    again = ensure_prepared(path)
    assert "c1" in tokenizer.decode(open_tokens(again.train).tolist() + open_tokens(again.val).tolist())


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', r"bad.jsonl line 2: invalid JSON \(Expecting ',' delimiter at column 13\)"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
     r"bad.jsonl line 2: no 'completion' key \(the first line set the prompt/completion format: 'prompt', 'completion'\)"),
    ("bad.jsonl", '{"text": "a"}\n\n{"prompt": "c", "completion": "d"}\n',
     r"bad.jsonl line 3: mixed formats: this line is prompt/completion but the first line set text \(text\)"),
    ("bad.jsonl", '{"text": "a"}\n{"text": 5}\n', r"bad.jsonl line 2: 'text' must be a string, got int"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n',
     r"bad.jsonl line 2: empty 'completion'"),
    ("bad.jsonl", '["a", "b"]\n', r"bad.jsonl line 1: expected an object with \"text\", or \"prompt\" and \"completion\""),
    ("bad.jsonl", '{"body": "a"}\n', r"bad.jsonl line 1: expected an object with \"text\""),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad.jsonl is not UTF-8 text \(invalid byte at offset 28\)"),
    ("bad.jsonl", "\n\n", r"bad.jsonl holds no examples"),
    ("bad.jsonl", '{"text": "only one"}\n', r"bad.jsonl holds 1 example; splitting train and val needs at least 2"),
    ("bad.csv", "title,body\nx,y\n", r"bad.csv has no column 'text' \(its columns: title, body\)"),
    ("bad.csv", "text\na\nb,c\n", r"bad.csv line 3: 2 fields, but the header has 1"),
    ("bad.csv", "", r"bad.csv is empty"),
    ("bad.csv", b"text\nok\ncaf\xe9\n", r"bad.csv is not UTF-8 text \(invalid byte at offset 11\)"),
])
def test_bad_data_is_one_error_naming_file_line_and_key(tmp_path, cli, name, content, message):
    import re

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        ensure_prepared(path)
    # through the CLI (data is prepared before the model loads): one line, exit 1
    code, _, err = cli("train", "--model", tmp_path / "no-model", "--data", path, "--out", tmp_path / "run")
    assert code == 1 and len(err.strip().splitlines()) == 1 and re.search(message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing half-written


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "notes.pdf").write_bytes(b"%PDF"), r"holds no .txt or .md files and no train.jsonl"),
    (lambda d: (d / "data.csv").write_text("text\na\n"), r"holds no .txt or .md files and no train.jsonl "
                                                           r"\(data.csv is there: give the file itself\)"),
    (lambda d: (write_jsonl(d / "train.jsonl", PAIRS), (d / "readme.txt").write_text("hi")),
     r"mixes formats: train.jsonl and text files \(readme.txt\)"),
    (lambda d: (write_jsonl(d / "train.jsonl", PAIRS), write_jsonl(d / "valid.jsonl", [{"text": "x"}])),
     r"valid.jsonl is text but train.jsonl is prompt/completion: mixed formats"),
    (lambda d: write_jsonl(d / "valid.jsonl", PAIRS), r"holds valid.jsonl but no train.jsonl"),
    (lambda d: ((d / "a.txt").write_bytes(b"ok"), (d / "b.txt").write_bytes(b"\xff\xfe")),
     r"b.txt is not UTF-8 text \(invalid byte at offset 0\)"),
])
def test_bad_folders(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        ensure_prepared(tmp_path)


def test_column_options_only_for_csv(tmp_path):
    with pytest.raises(DataError, match=r"--text-column, --prompt-column and --completion-column are for CSV"):
        ensure_prepared(write_jsonl(tmp_path / "a.jsonl", PAIRS), prep.Options(text_column="x"))
    with pytest.raises(DataError, match="give --text-column, or --prompt-column and --completion-column, not both"):
        ensure_prepared(write_csv(tmp_path / "a.csv", ["a"], [["x"]]),
                        prep.Options(text_column="a", prompt_column="b"))


# ----- masking and truncation: rows against the examples themselves -----

def _reference_rows(examples, window, mask_prompt):
    """Inputs/targets built straight from (prompt ids, completion ids), without the index."""
    xs, ys = [], []
    for prompt, completion in examples:
        ids = prompt + completion + [EOT]
        prompt_len = len(prompt)
        while len(ids) > window and prompt_len:  # the prompt's start goes first
            ids, prompt_len = ids[1:], prompt_len - 1
        ids = ids[:window]
        targets = [t if (i + 1 >= prompt_len or not mask_prompt) else -1 for i, t in enumerate(ids[1:])]
        xs.append(ids[:-1])
        ys.append(targets)
    width = max(len(x) for x in xs)
    return ([x + [0] * (width - len(x)) for x in xs], [y + [-1] * (width - len(y)) for y in ys])


@pytest.mark.parametrize("window", [6, 9, 64])
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_example_rows_mask_the_prompt_pad_and_cut_from_the_left(tmp_path, window, mask_prompt):
    p = ensure_prepared(write_jsonl(tmp_path / "qa.jsonl", PAIRS))
    tokens, index = open_tokens(p.train), open_index(p.index_path("train"))
    examples = [(tokens[s : s + pl].tolist(), tokens[s + pl : s + n - 1].tolist()) for s, pl, n in index[:8]]
    x, y = example_rows(tokens, index[:8], window, mask_prompt)
    rx, ry = _reference_rows(examples, window, mask_prompt)
    assert y.tolist() == ry
    assert (x * (y >= 0)).tolist() == (torch.tensor(rx) * (y >= 0)).tolist()  # padding inputs are free
    if window == 64:
        assert (y[:, 0] == -1).all() == mask_prompt  # a prompt's own tokens are never learned


def test_masked_loss_and_gradients_equal_a_plain_pytorch_reference(tiny_checkpoint, tmp_path):
    from lora_gpt2.config import LoRAConfig
    from lora_gpt2.checkpoints.hf import load_pretrained

    torch.manual_seed(0)
    model = load_pretrained(tiny_checkpoint[0], lora=LoRAConfig(targets=("qkv_projection", "lm_head"), r=4),
                            dtype=torch.float32, device="cpu")
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.02)  # a non-zero B, so the LoRA path counts
    p = ensure_prepared(write_jsonl(tmp_path / "qa.jsonl", PAIRS))
    x, y = example_rows(open_tokens(p.train), open_index(p.index_path("train"))[:6], 20, True)
    assert 0 < int((y >= 0).sum()) < y.numel()  # some targets are masked, some padding
    trainable = [q for q in model.parameters() if q.requires_grad]

    ours = model(x, targets=y)
    grads = torch.autograd.grad(ours, trainable)
    logits = model(x)  # full logits, then the textbook masked mean
    keep = y >= 0
    reference = F.cross_entropy(logits[keep], y[keep])
    ref_grads = torch.autograd.grad(reference, trainable)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    summed = model(x, targets=y, reduction="sum")
    torch.testing.assert_close(summed, reference * keep.sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_preparing_a_large_jsonl_keeps_memory_bounded(tmp_path):
    """Peak Python memory does not grow with the file: twice the lines, about the same peak."""
    import tracemalloc

    line = json.dumps({"prompt": "Tell me about " + "the sea " * 20, "completion": " It is wide " * 40}) + "\n"
    tokenizer.get_encoding()  # its tables are loaded once, whatever the data
    peaks = []
    for copies in (4_000, 16_000):
        folder = tmp_path / str(copies)
        folder.mkdir()
        (folder / "train.jsonl").write_text(line * copies)
        (folder / "valid.jsonl").write_text(line * 10)
        tracemalloc.start()
        prepared = ensure_prepared(folder)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert prepared.examples("train") == copies
    size = (tmp_path / "16000" / "train.jsonl").stat().st_size  # 11 MB
    assert peaks[1] < 1.25 * peaks[0] + 2**20 and peaks[1] < size / 2, (peaks, size)


def test_a_folder_of_one_real_document_and_empty_ones_cannot_be_split(tmp_path):
    (tmp_path / "a.txt").write_text("The only poem.\n")
    (tmp_path / "b.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"holds 1 document; splitting train and val needs at least 2$"):
        ensure_prepared(tmp_path)


def _tokens_of(prepared):
    return [t for split in ("train", "val") for t, _ in rows_of(prepared, split)]


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Excel saves CSV as UTF-8 with a BOM, and so do some JSONL writers: read them without it."""
    rows = [(f"row {i} says hello",) for i in range(12)]
    plain = ensure_prepared(write_csv(tmp_path / "plain.csv", ["text"], rows))
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    assert _tokens_of(ensure_prepared(excel)) == _tokens_of(plain)
    lines = write_jsonl(tmp_path / "plain.jsonl", PAIRS)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines.read_bytes())
    assert _tokens_of(ensure_prepared(bom)) == _tokens_of(ensure_prepared(lines))
    assert ensure_prepared(bom).kind == "prompt/completion"


def test_a_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    long = "word " * 40_000  # 200,000 characters in one cell; the csv module stops at 131,072
    rows = [(long if i == 3 else f"row {i}",) for i in range(12)]
    p = ensure_prepared(write_csv(tmp_path / "long.csv", ["text"], rows))
    assert max(len(t) for t in _tokens_of(p)) > 40_000


@pytest.mark.parametrize("line, message", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply to read"),
    ('{"text": "x", "n": ' + "7" * 5_000 + "}", "holds a number too long to read"),
])
def test_hostile_jsonl_lines_get_one_line_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"^{path} line 2: {message}"):
        ensure_prepared(path)
    first = tmp_path / "first.jsonl"
    first.write_text(line + "\n")
    with pytest.raises(DataError, match=f"^{first} line 1: {message}"):
        ensure_prepared(first)


def test_a_documents_folder_with_a_non_utf8_name_and_an_unreadable_file(tmp_path):
    import os

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello there\n" * 20)
    with open(os.fsencode(docs) + b"/b\xff.txt", "wb") as f:  # a name that is not UTF-8: still a document
        f.write(b"general kenobi\n" * 20)
    p = ensure_prepared(docs)
    assert p.examples("train") + p.examples("val") == 2
    locked = docs / "c.txt"
    if os.geteuid() == 0:  # root reads any file: a file whose reading fails (EIO) stands in for it
        os.symlink("/proc/self/mem", locked)
        expected = f"{locked} cannot be read (input/output error)"
    else:
        locked.write_text("you shall not read\n")
        locked.chmod(0)
        expected = f"{locked} cannot be read (permission denied)"
    with pytest.raises(DataError, match="^" + expected.replace("(", r"\(").replace(")", r"\)") + "$"):
        ensure_prepared(docs)
