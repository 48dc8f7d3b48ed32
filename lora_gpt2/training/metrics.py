"""metrics.jsonl: one JSON object per logged step, kept consistent with the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import WriteError


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a torn last line (a crash mid-append) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_after(path: Path, step: int) -> None:
    """Keep the records up to `step`: a resumed run then logs exactly what an unbroken one would."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
