"""Where `merge` and `export` may write: never into a run or an adapter, never over unrelated files."""

from __future__ import annotations

from pathlib import Path

from .adapter_dir import CHECKPOINT_NAMES, META_FILE, PREVIOUS

MERGED_FILES = frozenset({"config.json", "model.safetensors", "vocab.json", "merges.txt"})
PEFT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})


def _holds_run(path: Path) -> bool:
    """A training run folder, or a checkpoint folder inside one."""
    if (path / META_FILE).is_file():
        return True
    return any((path / name / META_FILE).is_file() or (path / f"{PREVIOUS}{name}").exists()
               for name in CHECKPOINT_NAMES)


def check_output_dir(out: Path, produces: frozenset[str], force: bool) -> None:
    """Refuse an output folder inside a run (always) or holding other files (unless `force`).

    A folder holding only what this command writes is an earlier output of it: overwritten.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file, not a folder")
    absolute = out.resolve()
    for folder in (absolute, *absolute.parents):
        if folder.is_dir() and _holds_run(folder):
            raise ValueError(f"output {out} is inside the training run or adapter {folder}; "
                             "writing there would damage it: choose a folder outside it")
    if not out.is_dir() or force:
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in produces)
    if others:
        raise ValueError(f"output {out} is not empty and holds {others[0]!r}, which this command did not write; "
                         "choose an empty folder, or pass --force to write into it anyway")
