"""Turn a UTF-8 text into train/val token files (uint16, numpy.memmap-readable) plus meta.json.

The split follows nanoGPT's Shakespeare preparation: the first 90% of the characters are
train, the last 10% val, each encoded with tiktoken `gpt2` `encode_ordinary`.

The token files go beside the text. When that folder cannot be written (a read-only dataset
share), they go to the user's cache instead (`LORA_GPT2_CACHE`, else `$XDG_CACHE_HOME/lora-gpt2`,
else `~/.cache/lora-gpt2`), in a folder named by the text's sha256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tokenizer
from .atomic import TMP_MARK, atomic_open, write_text
from .errors import DataError

META_FORMAT = 1
VAL_FRACTION = 0.1
TOKEN_DTYPE = np.uint16
CHUNK_CHARS = 1 << 20
CACHE_ENV = "LORA_GPT2_CACHE"
# A safe place to cut text for chunked encoding: "X\nY" with X, Y not whitespace. No GPT-2
# pre-token spans it, so encoding the pieces equals encoding the whole.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


@dataclass(frozen=True)
class Prepared:
    """Where a prepared text's files are, and its token counts."""

    text: Path
    train: Path
    val: Path
    meta: Path
    train_tokens: int
    val_tokens: int


def _names(text: Path, folder: Path | None = None) -> tuple[Path, Path, Path]:
    # nanoGPT's layout for input.txt; a prefix for any other file, so texts can share a folder
    prefix = "" if text.name == "input.txt" else f"{text.stem}."
    d = text.parent if folder is None else folder
    return d / f"{prefix}train.bin", d / f"{prefix}val.bin", d / f"{prefix}meta.json"


def cache_dir() -> Path:
    """Where lora-gpt2 keeps what it derives and may rebuild (token files of read-only texts)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "lora-gpt2")
    return Path(root).expanduser()


def cache_folder(text_sha256: str) -> Path:
    return cache_dir() / "data" / text_sha256[:16]


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


def text_path(data: str | Path) -> Path:
    """The text a `--data` value names: a file, or a folder holding input.txt."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / "input.txt"
    if not path.is_file():
        raise DataError(f"data {str(data)!r} not found: give a text file or a folder holding input.txt")
    return path


def read_text(path: Path) -> tuple[str, str]:
    """(text, sha256 of its bytes), with clear errors for empty and non-UTF-8 files."""
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path} is empty")
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (it holds NUL bytes), not UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    return text, hashlib.sha256(raw).hexdigest()


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


def prepare(text: Path, *, source_url: str | None = None, source_sha256: str | None = None,
            folder: Path | None = None) -> Prepared:
    """Split, encode and write the token files and meta.json beside `text` (or in `folder`)."""
    content, digest = read_text(text)
    split = int(len(content) * (1 - VAL_FRACTION))
    train_ids, val_ids = encode_chunked(content[:split]), encode_chunked(content[split:])
    train, val, meta = _names(text, folder)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for path, ids in ((train, train_ids), (val, val_ids)):
        with atomic_open(path, "wb") as f:
            f.write(ids.tobytes())
    info = {
        "format": META_FORMAT,
        "tokenizer": tokenizer.NAME,
        "dtype": "uint16",
        "text": text.name if folder is None else str(text.resolve()),
        "text_sha256": digest,
        "source_url": source_url or text.resolve().as_uri(),
        "source_sha256": source_sha256 or digest,
        "split": {"unit": "characters", "val_fraction": VAL_FRACTION, "train_chars": split,
                  "val_chars": len(content) - split},
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
    }
    write_text(meta, json.dumps(info, indent=2) + "\n")  # last: its presence marks completion
    return Prepared(text, train, val, meta, int(train_ids.size), int(val_ids.size))


def load_meta(text: Path, folder: Path | None = None) -> dict | None:
    _, _, meta = _names(text, folder)
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{meta} is not valid JSON; delete it to prepare the text again") from None
    if not isinstance(info, dict) or info.get("format") != META_FORMAT:
        raise DataError(f"{meta} has an unknown format; delete it to prepare the text again")
    return info


def check_prepared(text: Path, info: dict, folder: Path | None = None) -> Prepared:
    """The prepared files, after checking their sizes against meta.json."""
    train, val, meta = _names(text, folder)
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    counts = {}
    for split, path in (("train", train), ("val", val)):
        expected = info.get(f"{split}_tokens")
        if not path.is_file():
            raise DataError(f"{path} is missing though {meta.name} lists it; run again with --force")
        size = path.stat().st_size
        if not isinstance(expected, int) or size != expected * itemsize:
            raise DataError(
                f"{path} holds {size // itemsize} tokens ({size} bytes) but {meta.name} says "
                f"{expected}; the files disagree: prepare again (delete {meta.name})"
            )
        counts[split] = expected
    return Prepared(text, train, val, meta, counts["train"], counts["val"])


def current_meta(text: Path, folder: Path | None = None, digest: str | None = None) -> dict | None:
    """meta.json when it describes exactly this text (same sha256), else None."""
    info = load_meta(text, folder)
    if info is None:
        return None
    if digest is None:
        _, digest = read_text(text)
    return info if info.get("text_sha256") == digest else None


def ensure_prepared(data: str | Path) -> Prepared:
    """Prepare `data` on first use, and again whenever its text changed: beside the text, or in
    the cache when the text's folder is read-only."""
    text = text_path(data)
    _, digest = read_text(text)
    for folder in (None, cache_folder(digest)):
        info = current_meta(text, folder, digest)
        if info is not None:
            return check_prepared(text, info, folder)
    if _writable(text.parent):
        return prepare(text)
    try:
        return prepare(text, folder=cache_folder(digest))
    except OSError as exc:
        raise DataError(f"{text.parent} is read-only and the cache cannot take the token files either "
                        f"({exc}); set {CACHE_ENV} to a writable folder") from None
