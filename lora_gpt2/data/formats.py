"""What a `--data` value holds: a table of kinds, each one small class that reads examples.

The kind is decided from the path (a file's suffix, a folder's contents) and, for JSONL and
CSV, from the first line; every later line must follow it. A kind turns its files into
`Example`s (prompt, completion, or a conversation's messages); everything after that (tokens,
splits, masks, batches) sees only examples. Errors name the file, the line and the key.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import os
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .reading import bad_utf8_offset, hash_into, json_line, decode_utf8, readable

TEXT_SUFFIXES = (".txt", ".md")
TRAIN_ON = ("assistant", "all")  # chat data: what the loss counts
SPLIT_FILES = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}


@dataclass(frozen=True)
class Example:
    """One training example: `prompt + completion` (text examples have no prompt), or a
    conversation (`messages`, checked; its tokens come from the chat template)."""

    prompt: str
    completion: str
    messages: tuple = ()
    where: str = ""  # the file and line, for errors found later (a template that fails to render)


@dataclass(frozen=True)
class Options:
    """How to read a CSV, and the chat template of conversations (its text; None: the
    default): part of what a preparation depends on."""

    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        from ..chat_template import DEFAULT

        if self.chat_template == DEFAULT:  # the default's files keep their plain names
            object.__setattr__(self, "chat_template", None)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def columns(self) -> "Options":
        """The CSV columns alone (what a CSV's reading depends on)."""
        return dataclasses.replace(self, chat_template=None)

    def template(self):
        from ..chat_template import ChatTemplate

        return ChatTemplate() if self.chat_template is None else ChatTemplate(self.chat_template, "the chat template")

    def tag(self) -> str:
        """'' for the default reading, else a short name of these columns: the prepared files of
        one CSV read by other columns have other names, so two choices never share a file."""
        if not self.to_dict():
            return ""
        return "cols-" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10] + "."


@dataclass(frozen=True)
class Source:
    """A resolved `--data` value: its kind, its files per split ("all" when unsplit), and
    where its prepared files go (`folder`, with names starting `prefix`)."""

    path: Path
    kind: "Kind"
    files: dict[str, tuple[Path, ...]]
    folder: Path
    prefix: str
    options: Options = field(default_factory=Options)

    @property
    def layout(self) -> str:
        return self.kind.layout

    def all_files(self) -> list[Path]:
        return [f for files in self.files.values() for f in files]

    def sha256(self) -> str:
        """The content of every file (and its place), so any edit means preparing again; for a
        single file, the sha256 of its bytes."""
        if self.path.is_file():
            return hash_into(hashlib.sha256(), self.path).hexdigest()
        digest = hashlib.sha256()
        for f in sorted(self.all_files()):
            # the name's bytes: a name that is not UTF-8 is still a name
            digest.update(os.fsencode(f.relative_to(self.path) if self.path.is_dir() else f.name) + b"\0")
            hash_into(digest, f).update(b"\0")
        return digest.hexdigest()

    def examples(self, part: str) -> Iterator[Example]:
        for f in self.files[part]:
            with readable(f):
                yield from self.kind.read(f, self.options)

    def count(self, part: str) -> int:
        return sum(self._count(f) for f in self.files[part])

    def _count(self, path: Path) -> int:
        with readable(path):
            return self.kind.count(path, self.options)


class Kind:
    """One kind of data: its name, its layout and how to read one file into examples.

    layout "stream": one token stream (examples joined by <|endoftext|>), trained on random
    windows, as GPT-2 was. layout "examples": each example is its own row, padded, never
    seeing another example.
    """

    name = ""  # the data kind recorded in meta.json and adapter.json
    label = ""  # what an error message calls a line's format
    layout = "examples"
    prompted = False  # whether examples have a prompt to mask
    chat = False  # whether examples are conversations, tokenized by the chat template

    def read(self, path: Path, options: Options) -> Iterator[Example]:
        raise NotImplementedError

    def count(self, path: Path, options: Options) -> int:
        """How many examples `read` will yield (for the split and the progress bar)."""
        return sum(1 for _ in self.read(path, options))


class TextFile(Kind):
    """One text file: one document, split by characters as nanoGPT splits Shakespeare."""

    name, layout = "text", "stream"

    def read(self, path: Path, options: Options) -> Iterator[Example]:
        raw = path.read_bytes()
        if not raw:
            raise DataError(f"{path} is empty")
        yield Example("", decode_utf8(raw, str(path)))


class Documents(Kind):
    """A folder of text files: each file one document, joined by <|endoftext|>."""

    name, layout = "documents", "stream"

    def read(self, path: Path, options: Options) -> Iterator[Example]:
        text = decode_utf8(path.read_bytes(), str(path))
        if text.strip():  # an empty file is no document
            yield Example("", text)


class _Lines(Kind):
    """JSONL: one JSON object per line; the first line decides text or prompt/completion."""

    keys: tuple[str, ...] = ()

    def count(self, path: Path, options: Options) -> int:
        """Non-blank lines: each is one example (or an error that `read` reports)."""
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def read(self, path: Path, options: Options) -> Iterator[Example]:
        offset = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path} line {number}"
                if not raw.strip():  # the rule `count` uses: bytes that are ASCII whitespace
                    offset += len(raw)
                    continue
                line = decode_utf8(raw, str(path), offset).strip(" \t\r\n")
                offset += len(raw)
                yield self.example(json_line(line, where), where)

    def example(self, record, where: str) -> Example:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in self.keys if k not in record]
        if missing:
            other = next((k for k in JSONL_KINDS if k is not self and all(key in record for key in k.keys)), None)
            if other is not None:
                raise DataError(f"{where}: mixed formats: this line is {other.label} but the first line "
                                f"set {self.label} ({', '.join(self.keys)})")
            raise DataError(f"{where}: no {missing[0]!r} key (the first line set the {self.label} format: "
                            f"{', '.join(repr(k) for k in self.keys)})")
        values = []
        for key in self.keys:
            value = record[key]
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
            values.append(value)
        return _example(values, self.keys, where)


def _example(values: list[str], keys: tuple[str, ...], where: str) -> Example:
    if not values[-1].strip():
        raise DataError(f"{where}: empty {keys[-1]!r}")
    return Example(values[0], values[1]) if len(values) == 2 else Example("", values[0])


class JsonlText(_Lines):
    name, label, keys = "examples", "text", ("text",)


class JsonlPromptCompletion(_Lines):
    name, label, keys, prompted = "prompt/completion", "prompt/completion", ("prompt", "completion"), True


class JsonlChat(_Lines):
    """OpenAI's fine-tuning format: {"messages": [{"role", "content"}, ...]} per line."""

    name, label, keys, chat = "chat", "chat", ("messages",), True

    def example(self, record, where: str) -> Example:
        from ..chat_template import message_list

        if isinstance(record, dict) and "messages" in record:
            return Example("", "", tuple(message_list(record["messages"], where, training=True)), where)
        return super().example(record, where)


# the order a first line is tried in: chat, then prompt/completion (it may also hold "text")
JSONL_KINDS: list[_Lines] = [JsonlText(), JsonlPromptCompletion(), JsonlChat()]


class _Csv(Kind):
    """CSV with a header row; the columns come from the options (or their defaults)."""

    def columns(self, options: Options) -> tuple[str, ...]:
        raise NotImplementedError

    def read(self, path: Path, options: Options) -> Iterator[Example]:
        wanted = self.columns(options)
        # a long document in one cell is a cell: lift the csv module's 131,072-character limit
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:  # streamed; a BOM (Excel's) is not data
                yield from self._rows(path, csv.reader(f), wanted)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {bad_utf8_offset(path)})") from None
        except csv.Error as exc:
            raise DataError(f"{path}: not a CSV file a reader can use ({exc})") from None

    def _rows(self, path: Path, reader, wanted: tuple[str, ...]) -> Iterator[Example]:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty")
        index = {}
        for col in wanted:
            if col not in header:
                raise DataError(f"{path} has no column {col!r} (its columns: {', '.join(header)})")
            index[col] = header.index(col)
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, but the header has {len(header)}")
            yield _example([row[index[c]] for c in wanted], wanted, where)


class CsvText(_Csv):
    name, label = "examples", "text"

    def columns(self, options: Options) -> tuple[str, ...]:
        return (options.text_column or "text",)


class CsvPromptCompletion(_Csv):
    name, label, prompted = "prompt/completion", "prompt/completion", True

    def columns(self, options: Options) -> tuple[str, ...]:
        return (options.prompt_column or "prompt", options.completion_column or "completion")


def _jsonl_kind(path: Path) -> _Lines:
    """The kind the first non-empty line sets."""
    with readable(path), open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            record = json_line(decode_utf8(line, str(path)), f"{path} line {number}")
            if isinstance(record, dict):
                for kind in reversed(JSONL_KINDS):
                    if all(k in record for k in kind.keys):
                        return kind
            raise DataError(f"{path} line {number}: expected an object with \"text\", or \"prompt\" and "
                            f"\"completion\", or \"messages\"; got {line[:60].decode('utf-8', 'replace')}")
    raise DataError(f"{path} holds no examples")


def _csv_kind(path: Path, options: Options) -> _Csv:
    if options.prompt_column or options.completion_column:
        if options.text_column:
            raise DataError("give --text-column, or --prompt-column and --completion-column, not both")
        return CsvPromptCompletion()
    if options.text_column:
        return CsvText()
    with readable(path), open(path, "rb") as f:
        first = codecs.getincrementaldecoder("utf-8-sig")(errors="replace").decode(f.readline())
    header = next(csv.reader([first]), [])
    return CsvPromptCompletion() if "prompt" in header and "completion" in header else CsvText()


def _split_files(folder: Path, suffix: str) -> dict[str, tuple[Path, ...]]:
    files: dict[str, tuple[Path, ...]] = {}
    for split, stems in SPLIT_FILES.items():
        for stem in stems:
            if (folder / f"{stem}{suffix}").is_file():
                files[split] = (folder / f"{stem}{suffix}",)
                break
    return files


def located(data: str | Path) -> Path:
    """The path a `--data` value names, or a DataError when nothing is there."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data {str(data)!r} not found: give a text, JSONL or CSV file, or a folder")
    return path


def resolve(data: str | Path, options: Options = Options()) -> Source:
    """The Source a `--data` value names, or a DataError saying what is wrong with it."""
    path = located(data)
    source = _file_source(path, options.columns()) if path.is_file() else _folder_source(path, options.columns())
    if options.chat_template is None:
        return source
    if not source.kind.chat:
        raise DataError(f"--chat-template is for chat data (JSONL of {{\"messages\": [...]}}); {source.path} is "
                        f"{source.kind.label or source.kind.name} data")
    chat = Options(chat_template=options.chat_template)  # its files are named by the template
    return dataclasses.replace(source, options=chat, prefix=source.prefix + chat.tag())


def _file_source(path: Path, options: Options) -> Source:
    suffix = path.suffix.lower()
    prefix = ("" if path.name == "input.txt" else f"{path.stem}.") + (options.tag() if suffix == ".csv" else "")
    if suffix == ".jsonl":
        kind: Kind = _jsonl_kind(path)
    elif suffix == ".csv":
        kind = _csv_kind(path, options)
    else:
        kind = TextFile()
    if suffix != ".csv" and options.to_dict():
        raise DataError(f"--text-column, --prompt-column and --completion-column are for CSV files; {path} is not one")
    return Source(path, kind, {"all": (path,)}, path.parent, prefix, options if suffix == ".csv" else Options())


def _folder_source(folder: Path, options: Options) -> Source:
    if options.to_dict():
        raise DataError(f"--text-column, --prompt-column and --completion-column are for CSV files; {folder} is a folder")
    jsonl = _split_files(folder, ".jsonl")
    texts = sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if jsonl:
        if "train" not in jsonl:
            raise DataError(f"{folder} holds {jsonl[next(iter(jsonl))][0].name} but no train.jsonl")
        if texts:
            raise DataError(f"{folder} mixes formats: train.jsonl and text files ({texts[0].name}); "
                            "keep one kind of data per folder")
        kind = _jsonl_kind(jsonl["train"][0])
        for split, (f,) in jsonl.items():
            if split != "train" and _jsonl_kind(f) is not kind:
                raise DataError(f"{f} is {_jsonl_kind(f).label} but train.jsonl is {kind.label}: mixed formats")
        return Source(folder, kind, {s: jsonl[s] for s in ("train", "val") if s in jsonl}, folder, "")
    if len(texts) == 1:  # one text (input.txt, as download-data leaves it): as if given itself
        return _file_source(texts[0], options)
    if not texts:
        others = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jsonl", ".csv"))
        hint = f" ({others[0]} is there: give the file itself)" if others else ""
        raise DataError(f"{folder} holds no .txt or .md files and no train.jsonl{hint}")
    return Source(folder, Documents(), {"all": tuple(texts)}, folder, "documents.")
