"""Adapter-only checkpoints and training state, written atomically and checked on load.

A checkpoint is a folder: `adapter.safetensors` (the LoRA tensors alone), `adapter.json`
(everything needed to use it without the training config) and, for `last/`, `state.pt`
(optimiser, scheduler, step, RNG) for `--resume`. A folder is written under a temporary
name and swapped in whole, so a crash leaves the previous checkpoint loadable.

Readers never write: `read_checkpoint` reads adapter.json and the tensors of one consistent
checkpoint into memory (falling back to the previous folder while a swap is under way, and
reading again if a swap lands between the two files); only the process that owns the run
(the trainer) recovers interrupted swaps and removes temporaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import TMP_MARK, atomic_open, fsync_dir, write_bytes, write_text
from ..config import LoRAConfig, ModelConfig
from .. import chat_template
from ..errors import CheckpointError, DataError, WriteError
from ..runs import CHECKPOINTS
from ..adapters import variants
from ..adapters.lora import saved_tensors, start_adapters
from ..model.gpt2 import GPT2

ADAPTER_FORMAT = "lora-gpt2-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
STATE_FILE = "state.pt"
PREVIOUS = ".prev-"
READ_ATTEMPTS = 6  # a reader that meets a swap in progress reads again (a swap takes milliseconds)


@dataclass(frozen=True)
class EvalRecord:
    """adapter.json's "eval": what `lora-gpt2 eval` reproduces the run's validation numbers with,
    what `generate` needs to know of the data (its kind), and what `--resume` checks (its hash)."""

    data: str | None = None
    block_size: int | None = None
    batch_size: int | None = None
    eval_batches: int | None = None
    data_kind: str | None = None
    data_sha256: str | None = None
    mask_prompt: bool | None = None
    train_on: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None


# each "eval" key -> its type, read off the record (what parse_meta checks)
EVAL_SETTINGS = {name: next(t for t in typing.get_args(hint) if t is not type(None))
                 for name, hint in typing.get_type_hints(EvalRecord).items()}
_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


@dataclass(frozen=True)
class AdapterInfo:
    """What adapter.json says, checked."""

    path: Path
    base_model: str
    base_fingerprint: str | None
    lora: LoRAConfig
    meta: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    """One consistent checkpoint, read into memory: its adapter.json and the tensors it describes."""

    info: AdapterInfo
    tensors: dict[str, torch.Tensor]

    @property
    def path(self) -> Path:
        return self.info.path


def adapter_meta(model: GPT2, **extra: Any) -> dict[str, Any]:
    base = model.base
    return {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_gpt2_version": __version__,
        "base_model": base.source if base else None,
        "base_fingerprint": base.fingerprint if base else None,
        "base_config": asdict(model.config),
        "lora": variants.saved_config(model.lora_config).to_dict(),
        "tokenizer": "gpt2",
        **extra,
    }


def _adapter_bytes(model: GPT2) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in saved_tensors(model).items()}
    return save(tensors, metadata={"format": ADAPTER_FORMAT, "format_version": str(FORMAT_VERSION)})


def write_adapter_files(model: GPT2, directory: Path, **extra: Any) -> None:
    """adapter.safetensors, then adapter.json carrying its sha256 (detects any mismatch)."""
    data = _adapter_bytes(model)
    write_bytes(directory / ADAPTER_FILE, data)
    meta = adapter_meta(model, adapter_sha256=hashlib.sha256(data).hexdigest(), **extra)
    write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")


def save_checkpoint(directory: Path, model: GPT2, state: dict | None = None, **extra: Any) -> None:
    """Write a whole checkpoint folder under a temporary name, then swap it in."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{TMP_MARK}{os.getpid()}-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_adapter_files(model, tmp, **extra)
        if state is not None:
            with atomic_open(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
        _swap_in(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # the temporary files are internal: name the checkpoint
            reason = exc.reason if isinstance(exc, WriteError) else str(exc.strerror or exc)
            before = ("the previous one is intact" if directory.exists() else
                      "no earlier one exists")
            raise WriteError(f"cannot write checkpoint {directory}: {reason}; {before}", reason) from None
        raise


def _swap_in(tmp: Path, directory: Path) -> None:
    previous = directory.with_name(PREVIOUS + directory.name)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)  # a crash here: recover_checkpoint puts it back
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(previous, ignore_errors=True)


def recover_checkpoint(directory: Path) -> None:
    """Finish or undo a swap that a crash interrupted. For the run's owner only: readers never call it."""
    directory = Path(directory)
    previous = directory.with_name(PREVIOUS + directory.name)
    if previous.exists():
        if directory.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, directory)


def parse_meta(raw: bytes, meta_path: Path) -> AdapterInfo:
    """Check adapter.json's bytes: every field a reader relies on, by name and type."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path} is not valid JSON (truncated or corrupted?)") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{meta_path} is not a lora-gpt2 adapter description")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{meta_path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {version!r}, newer than this lora-gpt2 "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade lora-gpt2"
        )
    for key in ("base_model", "base_fingerprint", "adapter_sha256"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise CheckpointError(f"{meta_path}: {key} must be a string, got {meta[key]!r}")
    lora = meta.get("lora")
    if not isinstance(lora, dict):
        raise CheckpointError(f"{meta_path}: lora must be an object with targets and r, got {lora!r}")
    try:
        cfg = LoRAConfig.from_dict(variants.upgrade(lora))
        variants.check(cfg)
        if cfg.init != "default":  # writers save every init converted (variants.saved_config)
            raise ValueError(f"init {cfg.init!r} is a training-time start, never saved")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} has invalid LoRA settings ({exc})") from None
    settings = meta.get("eval")
    if settings is not None and not isinstance(settings, dict):
        raise CheckpointError(f"{meta_path}: eval must be an object, got {settings!r}")
    for key, kind in EVAL_SETTINGS.items():
        value = (settings or {}).get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CheckpointError(f"{meta_path}: eval.{key} must be {_TYPE_WORDS[kind]}, got {value!r}")
    if "chat_template" in meta:
        try:
            chat_template.from_record(meta["chat_template"], str(meta_path))
        except DataError as exc:
            raise CheckpointError(str(exc)) from None
    return AdapterInfo(meta_path.parent, meta.get("base_model") or "", meta.get("base_fingerprint"), cfg, meta)


def _candidates(path: Path):
    yield path
    if path.name in CHECKPOINTS:  # a checkpoint folder mid-swap: its previous version
        yield path.with_name(PREVIOUS + path.name)
    for name in CHECKPOINTS:  # a run folder
        yield path / name
        yield path / (PREVIOUS + name)


def find_adapter_dir(path: str | Path) -> Path:
    """The checkpoint folder a path names: itself, or a run's best/ (else last/). Read-only.

    While the trainer swaps a checkpoint in, the folder is briefly absent and its previous
    version sits under `.prev-NAME`: a reader uses that one rather than touching anything.
    """
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    for candidate in _candidates(path):
        if (candidate / META_FILE).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"adapter {str(path)!r} does not exist")
    raise CheckpointError(f"{path} holds no adapter ({META_FILE} and {ADAPTER_FILE} are missing)")


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """adapter.json of the checkpoint that `path` names (see find_adapter_dir), checked."""
    return read_checkpoint(path).info


def read_checkpoint(path: str | Path) -> Checkpoint:
    """adapter.json and the tensors of one consistent checkpoint, checked against its sha256.

    A swap that lands between reading the two files makes them disagree; then both are read
    again, a few times, before the mismatch is reported as damage.
    """
    problem: CheckpointError | None = None
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(0.01 * 2 ** min(attempt, 5))
        try:
            return _read_once(path)
        except _Torn as exc:
            problem = exc.error
    assert problem is not None
    raise problem


class _Torn(Exception):
    """The files disagree or vanished mid-read: perhaps a swap, so worth reading again."""

    def __init__(self, error: CheckpointError) -> None:
        self.error = error


def _read_once(path: str | Path) -> Checkpoint:
    directory = find_adapter_dir(path)
    meta_path, file = directory / META_FILE, directory / ADAPTER_FILE
    try:
        raw_meta = meta_path.read_bytes()
        data = file.read_bytes()
    except FileNotFoundError:
        error = CheckpointError(f"{directory} has {META_FILE} but no {ADAPTER_FILE}")
        raise _Torn(error) from None
    info = parse_meta(raw_meta, meta_path)
    expected_sha = info.meta.get("adapter_sha256")
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        raise _Torn(CheckpointError(f"{file} does not match the sha256 in {META_FILE} (corrupted or truncated)"))
    tensors = _tensors_from_bytes(data, file)
    _check_tensors_fit(info, tensors, file)
    return Checkpoint(info, tensors)


def _check_tensors_fit(info: AdapterInfo, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """What adapter.json states (rank, targets, blocks, variant) must be what the tensors are,
    or every reader would build one adapter and fill it from another."""
    try:
        config = ModelConfig(**{k: v for k, v in (info.meta.get("base_config") or {}).items()
                                if k in ModelConfig.__dataclass_fields__})
    except (TypeError, ValueError):
        return  # no usable base_config: the tensors are checked when they are applied to a model
    with torch.device("meta"):
        try:
            expected = {k: tuple(t.shape) for k, t in saved_tensors(GPT2(config, info.lora)).items()}
        except ValueError as exc:
            raise CheckpointError(f"{file}: adapter.json's LoRA settings do not fit its base model ({exc})") from None
    lora = info.lora
    says = f"adapter.json says r={lora.r}, targets {','.join(lora.targets)}, variant {lora.variant}"
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{file}: {says}, but it has no tensor {missing[0]}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: {says}, but it holds tensor {extra[0]}, which that has no place for")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{file}: {says}, but tensor {name} is {tuple(tensors[name].shape)} where that "
                                  f"needs {shape}")


def _tensors_from_bytes(data: bytes, file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None


def load_adapter_tensors(model: GPT2, checkpoint: Checkpoint) -> None:
    """Start the model's adapter layers from a checkpoint's tensors, strictly (adapters.start_adapters)."""
    start_adapters(model, checkpoint.tensors, str(checkpoint.path / ADAPTER_FILE))


def load_state(directory: Path) -> dict:
    """state.pt, loaded with weights_only=True: a pickle can never run code here."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; nothing to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} cannot be loaded safely ({reason})") from None
