"""Turn a `--data` source into train/val token files plus meta.json, once, and again on change.

Per split: `train.bin` (uint16 GPT-2 ids, `numpy.memmap`-readable) and, for example data,
`train.idx` (int64 rows: start, prompt tokens, length; the loss mask is "position >= prompt
tokens", so it costs 8 bytes per example instead of a byte per token). Conversations have
turns, not one prompt, so chat data adds `train.mask`: a byte of marks per token
(`chat_template.LEARN`, `MESSAGE`, ...), aligned with train.bin. A text file is split as
nanoGPT splits Shakespeare: the first 90% of the characters are train. Anything else is split
by examples (documents, lines, rows): a seeded shuffle puts 10% in val, unless the data names
its own validation file. meta.json is written last; its presence marks a finished preparation.

The files go beside the data. When that folder cannot be written (a read-only dataset share),
they go to the user's cache instead (`LORA_GPT2_CACHE`, else `$XDG_CACHE_HOME/lora-gpt2`, else
`~/.cache/lora-gpt2`), in a folder named by the data's sha256.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import tokenizer
from ..atomic import TMP_MARK, atomic_open, write_text
from ..errors import DataError
from .encoding import TOKEN_DTYPE, encode_chunked, encoded
from .formats import Options, Source, resolve

META_FORMAT = 1
VAL_FRACTION = 0.1
SPLIT_SEED = 1337
INDEX_DTYPE = np.int64  # rows of (start, prompt tokens, length)
ENCODE_BATCH = 2048  # examples tokenized together (the threads share them); bounds memory
CACHE_ENV = "LORA_GPT2_CACHE"

# progress(done, total): examples for example data, 1 of 1 for a text file
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Prepared:
    """Where a source's prepared files are, and what they hold."""

    source: Source
    meta: Path
    info: dict

    @property
    def layout(self) -> str:
        return self.info.get("layout", "stream")

    @property
    def kind(self) -> str:
        return self.info.get("kind", "text")

    def tokens_path(self, split: str) -> Path:
        return self.meta.parent / f"{self.source.prefix}{split}.bin"

    def index_path(self, split: str) -> Path:
        return self.meta.parent / f"{self.source.prefix}{split}.idx"

    def mask_path(self, split: str) -> Path:
        return self.meta.parent / f"{self.source.prefix}{split}.mask"

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    @property
    def train(self) -> Path:
        return self.tokens_path("train")

    @property
    def val(self) -> Path:
        return self.tokens_path("val")

    @property
    def train_tokens(self) -> int:
        return self.info["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.info["val_tokens"]

    def examples(self, split: str) -> int | None:
        return self.info.get(f"{split}_examples")


def cache_dir() -> Path:
    """Where lora-gpt2 keeps what it derives and may rebuild (token files of read-only data)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "lora-gpt2")
    return Path(root).expanduser()


def cache_folder(source: Source, digest: str) -> Path:
    key = hashlib.sha256(json.dumps([digest, source.kind.name, source.options.to_dict()]).encode()).hexdigest()
    return cache_dir() / "data" / key[:16]


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (a real attempt: root ignores permission bits,
    and a read-only mount refuses even root)."""
    probe = folder / f"{TMP_MARK}{os.getpid()}-probe"
    try:
        probe.touch()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise
    probe.unlink()
    return True


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _SplitWriter:
    """One split's token file (and index, for example data), written as examples arrive."""

    def __init__(self, tokens, index, joined: bool, marks=None) -> None:
        self.tokens, self.index, self.joined, self.marks = tokens, index, joined, marks
        self.count = 0  # tokens written
        self.examples = 0
        self.longest = 0

    def add(self, prompt: np.ndarray, completion: np.ndarray, marks: np.ndarray | None = None) -> None:
        if self.joined:  # a stream of documents: <|endoftext|> between them
            ids = np.concatenate([_EOT, completion]) if self.examples else completion
        else:  # an example: prompt + completion + <|endoftext|>; a conversation as its template ends it
            ids = np.concatenate([prompt, completion, _EOT]) if marks is None else completion
            if marks is not None:
                self.marks.write(marks.tobytes())
            row = np.array([self.count, len(prompt), len(ids)], dtype=INDEX_DTYPE)
            self.index.write(row.tobytes())
            self.longest = max(self.longest, len(ids))
        self.tokens.write(ids.tobytes())
        self.count += len(ids)
        self.examples += 1


_EOT = np.array([tokenizer.EOT_ID], dtype=TOKEN_DTYPE)


def _val_members(source: Source, total: int) -> np.ndarray:
    """Which of `total` examples are val: a seeded shuffle's first 10%."""
    if total < 2:
        unit = "document" if source.layout == "stream" else "example"
        raise DataError(f"{source.path} holds {total} {unit}{'s' * (total != 1)}; splitting train and val "
                        "needs at least 2" + ("" if source.layout == "stream" else " (or give a valid.jsonl)"))
    n_val = max(1, round(total * VAL_FRACTION))
    member = np.zeros(total, dtype=bool)
    member[np.random.default_rng(SPLIT_SEED).permutation(total)[:n_val]] = True
    return member


def _prepare_examples(source: Source, folder: Path, progress: Progress | None) -> dict:
    joined = source.layout == "stream"
    given = "val" in source.files  # the data names its validation file
    if given:
        totals = {part: source.count(part) for part in ("train", "val")}
        parts: list[tuple[str, str | None]] = [("train", "train"), ("val", "val")]
        member = None
    else:  # split it: 10% of the examples, chosen by a seeded shuffle
        whole = "all" if "all" in source.files else "train"
        totals = {whole: source.count(whole)}
        member = _val_members(source, totals[whole])
        parts = [(whole, None)]
    grand_total, done = sum(totals.values()), 0
    names = {split: (folder / f"{source.prefix}{split}.bin", folder / f"{source.prefix}{split}.idx")
             for split in ("train", "val")}
    template = source.options.template() if source.kind.chat else None
    with contextlib.ExitStack() as stack:
        writers = {}
        for split, (bin_path, idx_path) in names.items():
            tokens = stack.enter_context(atomic_open(bin_path, "wb"))
            index = None if joined else stack.enter_context(atomic_open(idx_path, "wb"))
            marks = stack.enter_context(atomic_open(bin_path.with_suffix(".mask"), "wb")) if template else None
            writers[split] = _SplitWriter(tokens, index, joined, marks)
        for part, split in parts:
            position = 0
            for batch in _batched(source.examples(part), ENCODE_BATCH):
                for tokens in encoded(source.kind.prompted, template, batch):
                    target = split or ("val" if member[position] else "train")
                    writers[target].add(*tokens)
                    position += 1
                done += len(batch)
                del batch  # before the next batch is read: one batch in memory
                if progress:
                    progress(done, grand_total)
        for split, writer in writers.items():
            if writer.examples == 0:
                raise DataError(f"{source.path}: the {split} split holds no examples")
    info = {"layout": source.layout, "kind": source.kind.name, "options": source.options.to_dict()}
    for split, writer in writers.items():
        info[f"{split}_tokens"] = writer.count
        info[f"{split}_examples"] = writer.examples
        if not joined:
            info[f"{split}_longest"] = writer.longest
    info["split"] = ({"unit": "files", "val": str(source.files["val"][0].name)} if given else
                     {"unit": "documents" if joined else "examples", "val_fraction": VAL_FRACTION,
                      "seed": SPLIT_SEED, "shuffle": "numpy.random.default_rng(seed).permutation"})
    return info


def _prepare_text(source: Source, folder: Path, progress: Progress | None) -> dict:
    [example] = source.examples("all")
    content = example.completion
    split = int(len(content) * (1 - VAL_FRACTION))
    train_ids, val_ids = encode_chunked(content[:split]), encode_chunked(content[split:])
    for name, ids in (("train", train_ids), ("val", val_ids)):
        with atomic_open(folder / f"{source.prefix}{name}.bin", "wb") as f:
            f.write(ids.tobytes())
    return {"layout": "stream", "kind": "text", "options": {},
            "split": {"unit": "characters", "val_fraction": VAL_FRACTION, "train_chars": split,
                      "val_chars": len(content) - split},
            "train_tokens": int(train_ids.size), "val_tokens": int(val_ids.size)}


def prepare(source: Source, *, folder: Path | None = None, digest: str | None = None,
            source_url: str | None = None, source_sha256: str | None = None,
            progress: Progress | None = None) -> Prepared:
    """Encode and split `source`, writing its token files and meta.json in `folder`."""
    folder = source.folder if folder is None else folder
    digest = digest or source.sha256()
    folder.mkdir(parents=True, exist_ok=True)
    build = _prepare_text if source.kind.name == "text" else _prepare_examples
    details = build(source, folder, progress)
    info = {
        "format": META_FORMAT,
        "tokenizer": tokenizer.NAME,
        "dtype": "uint16",
        "text": source.path.name if folder == source.folder else str(source.path.resolve()),
        "text_sha256": digest,
        "source_url": source_url or source.path.resolve().as_uri(),
        "source_sha256": source_sha256 or digest,
        **details,
    }
    meta = folder / f"{source.prefix}meta.json"
    write_text(meta, json.dumps(info, indent=2) + "\n")  # last: its presence marks completion
    return Prepared(source, meta, info)


def load_meta(meta: Path) -> dict | None:
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{meta} is not valid JSON; delete it to prepare the data again") from None
    if not isinstance(info, dict) or info.get("format") != META_FORMAT:
        raise DataError(f"{meta} has an unknown format; delete it to prepare the data again")
    return info


def check_prepared(prepared: Prepared) -> Prepared:
    """The prepared files, after checking their sizes against meta.json."""
    info, meta = prepared.info, prepared.meta
    for split in ("train", "val"):
        checks = [(prepared.tokens_path(split), f"{split}_tokens", np.dtype(TOKEN_DTYPE).itemsize, "tokens")]
        if prepared.layout == "examples":
            checks.append((prepared.index_path(split), f"{split}_examples", 3 * np.dtype(INDEX_DTYPE).itemsize,
                           "examples"))
        if prepared.chat:
            checks.append((prepared.mask_path(split), f"{split}_tokens", 1, "token marks"))
        for path, key, unit, what in checks:
            expected = info.get(key)
            if not path.is_file():
                raise DataError(f"{path} is missing though {meta.name} lists it; prepare again (delete {meta.name})")
            size = path.stat().st_size
            if not isinstance(expected, int) or size != expected * unit:
                raise DataError(
                    f"{path} holds {size // unit} {what} ({size} bytes) but {meta.name} says "
                    f"{expected}; the files disagree: prepare again (delete {meta.name})"
                )
    return prepared


def current(source: Source, folder: Path, digest: str) -> Prepared | None:
    """The preparation in `folder` when it describes exactly this source (same sha256, kind
    and options), else None."""
    meta = folder / f"{source.prefix}meta.json"
    info = load_meta(meta)
    if info is None or info.get("text_sha256") != digest:
        return None
    if info.get("kind", "text") != source.kind.name or info.get("options", {}) != source.options.to_dict():
        return None
    return Prepared(source, meta, info)


@contextlib.contextmanager
def _preparing_in(folder: Path) -> Iterator[None]:
    """One preparation at a time in `folder`, across processes: an flock on the folder itself, so
    that a second process waits and then finds the files made (no lock file is left behind)."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here (or the folder cannot be opened): names still differ
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_prepared(data: str | Path, options: Options = Options(), progress: Progress | None = None) -> Prepared:
    """Prepare `data` on first use, and again whenever it changed: beside it, or in the cache
    when its folder is read-only.

    Files are named by what decides them besides the content (the CSV columns, see
    `Options.tag`) and meta.json records the content's sha256, kind and options; preparing and
    checking happen under the folder's lock, so processes starting together each read files
    identical to a clean preparation of their own choice."""
    source = resolve(data, options)
    digest = source.sha256()
    cache = cache_folder(source, digest)
    for folder in (source.folder, cache):
        found = current(source, folder, digest)
        if found is not None:
            return check_prepared(found)
    writable = _writable(source.folder)
    folder = source.folder if writable else cache
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _preparing_in(folder):
            found = current(source, folder, digest)  # made while this process waited
            if found is not None:
                return check_prepared(found)
            return prepare(source, folder=folder, digest=digest, progress=progress)
    except OSError as exc:
        if writable:
            raise
        raise DataError(f"{source.folder} is read-only and the cache cannot take the token files either "
                        f"({exc}); set {CACHE_ENV} to a writable folder") from None

