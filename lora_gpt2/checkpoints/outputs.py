"""Where `merge` and `export` may write: never into a run or an adapter, never over unrelated files
or an existing file unless told."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs import CHECKPOINTS
from .adapter_dir import META_FILE, PREVIOUS

TOKENIZER_FILES = frozenset({"vocab.json", "merges.txt", "tokenizer_config.json"})
MERGED_FILES = frozenset({"config.json", "model.safetensors"}) | TOKENIZER_FILES
PEFT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"}) | TOKENIZER_FILES
# what `merge` and `export` write into their weights file's safetensors metadata: an earlier
# output is recognised by this, not by file names another tool uses too
WRITTEN_BY = {"written_by": "lora-gpt2"}
_WEIGHTS = {MERGED_FILES: "model.safetensors", PEFT_FILES: "adapter_model.safetensors"}


def _written_here(weights: Path) -> bool:
    """Whether a safetensors file carries WRITTEN_BY (its header is read, not its tensors)."""
    try:
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 26:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in WRITTEN_BY.items())


def _holds_run(path: Path) -> bool:
    """A training run folder, or a checkpoint folder inside one."""
    if (path / META_FILE).is_file():
        return True
    return any((path / name / META_FILE).is_file() or (path / f"{PREVIOUS}{name}").exists()
               for name in CHECKPOINTS)


def check_output_dir(out: Path, produces: frozenset[str], force: bool) -> None:
    """Refuse an output folder inside a run (always) or holding other files (unless `force`).

    A folder holding only what this command writes is an earlier output of it: overwritten.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file, not a folder")
    _refuse_inside_run(out, out.resolve())
    if not out.is_dir() or force:
        return
    names = sorted(p.name for p in out.iterdir())
    others = [name for name in names if name not in produces]
    if not others and names and not _written_here(out / _WEIGHTS[produces]):
        others = names  # the same file names, written by another tool (or by hand)
    if others:
        raise ValueError(f"output {out} is not empty and holds {others[0]!r}, which this command did not write; "
                         "choose an empty folder, or pass --force to write into it anyway")


def check_output_file(out: Path, force: bool) -> None:
    """Refuse an output file inside a run (always), a folder, or a file that exists (unless `force`)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; give the file to write, such as {out / 'model.gguf'}")
    _refuse_inside_run(out, out.resolve().parent)
    if out.exists() and not force:
        raise ValueError(f"output {out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {out.parent} does not exist")


def _refuse_inside_run(out: Path, absolute: Path) -> None:
    for folder in (absolute, *absolute.parents):
        if folder.is_dir() and _holds_run(folder):
            raise ValueError(f"output {out} is inside the training run or adapter {folder}; "
                             "writing there would damage it: choose a folder outside it")
