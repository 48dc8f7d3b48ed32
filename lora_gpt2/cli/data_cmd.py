"""`lora-gpt2 download-data`: fetch Tiny Shakespeare (or any text URL) and prepare its token files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app
from .output import progress, say

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
    from ..download import (
        TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, RetryPolicy, fetch, is_valid_copy, sha256_of,
    )
    from ..prepare import check_prepared, current_meta, prepare

    source = url or TINY_SHAKESPEARE_URL
    expected = sha256.lower() if sha256 else (TINY_SHAKESPEARE_SHA256 if source == TINY_SHAKESPEARE_URL else None)
    if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise ValueError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    dest = data_dir / "input.txt"

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

    info = None if force else current_meta(dest)
    if info is not None:
        prepared = check_prepared(dest, info)
        say("token files are up to date")
    else:
        prepared = prepare(dest, source_url=source, source_sha256=expected or sha256_of(dest))
    say(f"train: {prepared.train_tokens:,} tokens ({prepared.train})")
    say(f"val: {prepared.val_tokens:,} tokens ({prepared.val})")
