"""Find a GPT-2 checkpoint directory: a local path, or a Hub id through huggingface_hub's cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_checkpoint(name_or_path: str) -> Path:
    """A directory holding config.json and the weights, for a local path or a Hub id."""
    if not name_or_path:
        raise CheckpointError("no model given: pass a Hub id such as 'gpt2' or a local directory")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {name_or_path!r} is a file; pass its directory")
    if not HUB_ID.match(name_or_path):
        raise CheckpointError(f"model directory {name_or_path!r} does not exist")
    return _download(name_or_path)


def _download(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import logging as hub_logging

    def fetch(filename: str) -> Path:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename))

    offline_hint = (
        f"model {repo_id!r} is not in the Hugging Face cache and the Hub cannot be reached"
        f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}; "
        "pass a local directory holding config.json and model.safetensors with --model PATH"
    )
    hub_logging.set_verbosity_error()  # its retry warnings are not ours to print
    try:
        config = fetch("config.json")
        missing_locally = False
        for filename in WEIGHT_FILES:
            try:
                fetch(filename)
            except hub_errors.RemoteEntryNotFoundError:
                continue
            except hub_errors.LocalEntryNotFoundError:
                missing_locally = True
                continue
            if filename.endswith(".index.json"):
                _fetch_shards(config.parent / filename, fetch)
            return config.parent
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError):
        raise CheckpointError(
            f"model {repo_id!r} was not found on the Hugging Face Hub "
            "(for a local checkpoint, pass an existing directory)"
        ) from None
    except hub_errors.LocalEntryNotFoundError:
        raise CheckpointError(offline_hint) from None
    except (OSError, hub_errors.HfHubHTTPError) as exc:
        raise CheckpointError(f"{offline_hint} ({type(exc).__name__})") from None
    if missing_locally:
        raise CheckpointError(offline_hint)
    raise CheckpointError(f"model {repo_id!r} on the Hub has no weights ({', '.join(WEIGHT_FILES)})")


def _fetch_shards(index_path: Path, fetch) -> None:
    import json

    for shard in sorted(set(json.loads(index_path.read_text())["weight_map"].values())):
        fetch(shard)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
