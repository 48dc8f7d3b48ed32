"""`lora-gpt2 download-data`: fetch Tiny Shakespeare (or any text URL) and prepare its token files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app
from .output import LazyProgress, progress, say

DATA_DIR_ENV = "LORA_GPT2_DATA_DIR"
DEFAULT_DATA_DIR = "data/tinyshakespeare"


@app.command("download-data")
def download_data_cmd(
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", envvar=DATA_DIR_ENV,
        help=f"Folder for input.txt and its token files (env {DATA_DIR_ENV}).",
    ),
    url: Optional[str] = typer.Option(
        None, "--url", help="Mirror or other text: http(s):// or file:// (default: Tiny Shakespeare)."
    ),
    sha256: Optional[str] = typer.Option(
        None, "--sha256", help="Expected sha256 of the file (known for the default source)."
    ),
    force: bool = typer.Option(False, "--force", help="Fetch and prepare again even if present."),
    retries: int = typer.Option(4, "--retries", min=0, max=20,
                                help="Retries on connection errors, timeouts and 5xx."),
    timeout: float = typer.Option(1800.0, "--timeout", min=1.0,
                                  help="Give up on the whole download (all retries) after this many seconds."),
) -> None:
    """Download Tiny Shakespeare (or --url) into --data-dir and write train.bin, val.bin, meta.json."""
    from ..data.download import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, RetryPolicy, fetch, is_valid_copy, sha256_of
    from ..data import prepare as prep
    from ..data.formats import resolve

    source = url or TINY_SHAKESPEARE_URL
    expected = sha256.lower() if sha256 else (TINY_SHAKESPEARE_SHA256 if source == TINY_SHAKESPEARE_URL else None)
    if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise ValueError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    dest = data_dir / _file_name(source)

    if not force and is_valid_copy(dest, expected):
        say(f"{dest} is already present{' and verified' if expected else ''}; not downloading it again")
    else:
        if dest.exists() and not force:
            say(f"{dest} does not match the expected checksum; downloading it again")
        say(f"downloading {source}")
        with progress(None, "download", bytes_=True) as bar:
            def on_bytes(n: int, total: int | None) -> None:
                if total and bar.total != total:
                    bar.total = total
                bar.update(n)

            fetch(source, dest, sha256=expected, progress=on_bytes,
                  policy=RetryPolicy(attempts=retries + 1, deadline=timeout))
        say(f"saved {dest}" + (" (sha256 verified)" if expected else ""))

    data = resolve(dest)
    digest = data.sha256()
    found = None if force else prep.current(data, data.folder, digest)
    if found is not None:
        prepared = prep.check_prepared(found)
        say("token files are up to date")
    else:
        with LazyProgress("prepare", "examples") as bar:
            prepared = prep.prepare(data, digest=digest, source_url=source,
                                    source_sha256=expected or sha256_of(dest), progress=bar)
    examples = {split: prepared.examples(split) for split in ("train", "val")}
    for split, path in (("train", prepared.train), ("val", prepared.val)):
        count = f" in {examples[split]:,} {'documents' if prepared.layout == 'stream' else 'examples'}" \
            if examples[split] is not None else ""
        say(f"{split}: {prepared.info[f'{split}_tokens']:,} tokens{count} ({path})")


def _file_name(url: str) -> str:
    """input.txt (nanoGPT's name) for text; a JSONL or CSV keeps its own name, which says its format."""
    from urllib.parse import unquote, urlparse

    name = Path(unquote(urlparse(url).path)).name
    return name if Path(name).suffix.lower() in (".jsonl", ".csv") else "input.txt"
