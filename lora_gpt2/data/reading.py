"""Reading a data file's bytes: UTF-8 (without a byte order mark), JSON lines that may be
hostile, and files that cannot be read, each refused in one line naming the file."""

from __future__ import annotations

import codecs
import contextlib
import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError


@contextlib.contextmanager
def readable(path: Path) -> Iterator[None]:
    """A file that cannot be read (permissions, I/O) named, with the reason in words."""
    try:
        yield
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise DataError(f"{exc.filename or path} cannot be read ({reason})") from None

def hash_into(digest, path: Path):
    """`digest` updated with the bytes of `path`, read in blocks; an unreadable file is named."""
    with readable(path), open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest

def decode_utf8(raw: bytes, where: str, offset: int = 0) -> str:
    """UTF-8 text, without the byte order mark a file may start with (Excel writes one)."""
    if offset == 0 and raw.startswith(codecs.BOM_UTF8):
        raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{where} looks binary (it holds NUL bytes, the first at offset {offset + nul}), "
                        "not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text (invalid byte at offset {offset + exc.start})") from None

def json_line(line: str, where: str):
    """One JSONL line's value, or one line naming the file, the line and what is wrong."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:  # valid JSON nested deeper than Python's parser goes
        raise DataError(f"{where}: nested too deeply to read") from None
    except ValueError as exc:  # an integer beyond Python's int-string limit
        raise DataError(f"{where}: holds a number too long to read ({' '.join(str(exc).split())[:100]})") from None

def bad_utf8_offset(path: Path) -> int:
    """Where a file stops being UTF-8 (read again in blocks, only to say so)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start
            offset += len(block)
    return offset
