"""Training configuration: one frozen dataclass per concern, read from TOML and flags.

Precedence: command-line flag > `--config FILE` > built-in defaults. In a TOML file each
concern is a table (`[model]`, `[data]`, `[optim]`, `[run]`); every field name is unique
across tables, so the flag for a field is `--` plus its name with `-` for `_`.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ..config import DEVICES, DTYPES, LoRAConfig, resolve_targets
from ..data.formats import Options

OPTIMIZERS = ("adamw", "adam")
LOGGERS = ("tensorboard", "wandb")  # besides metrics.jsonl and loss.png, which every run writes
MAX_MICRO_BATCH_TOKENS = 2**24  # far beyond any accelerator's memory for GPT-2


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not (value > 0) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value) -> None:
    if not (value >= 0) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ModelSettings:
    model: str = "gpt2"  # Hub id or local checkpoint directory
    targets: tuple[str, ...] = ("qkv_projection", "output_projection", "linear_in", "linear_out")
    rank: int = 8
    alpha: Optional[float] = 16.0  # None means alpha = rank
    dropout: float = 0.05
    dtype: str = "auto"  # frozen-weight storage; auto = bfloat16 on CUDA, float32 elsewhere
    rslora: bool = False  # scaling = alpha / sqrt(rank) (rank-stabilised LoRA)
    layers: Optional[str] = None  # per-block targets only in these blocks: "N" (last N), "A-B", "A,B,C"
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", resolve_targets(self.targets))
        if not self.targets:
            raise ValueError("targets must name at least one module to train")
        if not self.model:
            raise ValueError("model must be a Hub id or a checkpoint directory, got ''")
        self.lora  # noqa: B018 - rank, alpha and dropout are checked where the library checks them
        _choice("dtype", self.dtype, DTYPES)

    @property
    def lora(self) -> LoRAConfig:
        """The library's LoRA settings: `rank` here is `r` there (alpha=None there means alpha = r)."""
        return LoRAConfig(targets=self.targets, r=self.rank, alpha=self.alpha, dropout=self.dropout,
                          rslora=self.rslora, layers=self.layers, dora=self.dora)


@dataclass(frozen=True)
class DataSettings:
    data: str = "data/tinyshakespeare"  # text, JSONL or CSV file, or a folder (see data/formats.py)
    block_size: int = 256
    batch_size: int = 8  # per process, per micro-step
    text_column: Optional[str] = None  # CSV: the column of texts (default "text")
    prompt_column: Optional[str] = None  # CSV: prompt/completion columns (default "prompt", "completion")
    completion_column: Optional[str] = None
    mask_prompt: Optional[bool] = None  # count only the completion's loss; None: on for prompt/completion data
    packing: bool = False  # example data: several examples per row (block-diagonal attention) instead of padding

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data must be a text file or a folder, got ''")
        for name in ("text_column", "prompt_column", "completion_column"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must name a CSV column, got ''")
        _positive("block_size", self.block_size)
        _positive("batch_size", self.batch_size)
        if self.batch_size * self.block_size > MAX_MICRO_BATCH_TOKENS:
            raise ValueError(
                f"batch_size x block_size = {self.batch_size * self.block_size:,} tokens per micro-batch is "
                f"more than {MAX_MICRO_BATCH_TOKENS:,}; use --grad-accum for large batches")

    @property
    def options(self) -> Options:
        """How to read the data (CSV columns): what its preparation depends on."""
        return Options(self.text_column, self.prompt_column, self.completion_column)


@dataclass(frozen=True)
class OptimSettings:
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    lora_plus_ratio: Optional[float] = None  # LoRA+: lora_b learns at this many times lr (16 is the paper's)
    grad_accum: int = 1
    max_steps: Optional[int] = 1000
    epochs: Optional[float] = None  # instead of max_steps: passes over the train tokens

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("lr", self.lr)
        _positive("lora_plus_ratio", self.lora_plus_ratio, allow_none=True)
        _non_negative("weight_decay", self.weight_decay)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        _non_negative("warmup_steps", self.warmup_steps)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _non_negative("grad_clip", self.grad_clip)
        _positive("grad_accum", self.grad_accum)
        _positive("max_steps", self.max_steps, allow_none=True)
        _positive("epochs", self.epochs, allow_none=True)
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps and epochs")


@dataclass(frozen=True)
class RunSettings:
    out: str = "out/shakespeare"
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    save_interval: Optional[int] = None  # None: checkpoint at every evaluation
    save_interval_minutes: Optional[float] = None  # also checkpoint last/ when this much time has passed
    device: str = "auto"
    seed: int = 1337
    compile: bool = False
    grad_checkpoint: bool = False  # recompute each block's activations in backward (keeps block inputs only)
    log: tuple[str, ...] = ()  # extra loggers: tensorboard, wandb

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out must be a directory, got ''")
        for name in ("eval_interval", "eval_batches", "log_interval"):
            _positive(name, getattr(self, name))
        _positive("save_interval", self.save_interval, allow_none=True)
        _positive("save_interval_minutes", self.save_interval_minutes, allow_none=True)
        _choice("device", self.device, DEVICES)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        for name in self.log:
            _choice("log", name, LOGGERS)
        object.__setattr__(self, "log", tuple(dict.fromkeys(self.log)))  # --log wandb --log wandb: once


SECTIONS = {"model": ModelSettings, "data": DataSettings, "optim": OptimSettings, "run": RunSettings}
# field name -> section; names are unique across sections, which makes flat flags possible
FIELD_SECTION = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    run: RunSettings = RunSettings()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: _plain(asdict(getattr(self, section))) for section in SECTIONS}

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
            lines.append("")
        return "\n".join(lines)


def _plain(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _field_type(section: str, name: str):
    hints = typing.get_type_hints(SECTIONS[section])
    return hints[name]


def _coerce(key: str, value: Any, hint) -> Any:
    """Check a TOML or flag value against the field's type; name the key when it is wrong."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of names, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unhandled type {hint} for {key}")  # internal: a new field type


def read_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Sectioned values from a TOML file, checked for unknown keys and wrong types."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    return read_toml_text(text, str(path))


def read_toml_text(text: str, origin: str = "config") -> dict[str, dict[str, Any]]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    path = origin
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown section [{section}] in {path}; valid: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ValueError(f"{section} in {path} must be a table [{section}]")
        for key, value in table.items():
            if FIELD_SECTION.get(key) != section:
                raise ValueError(f"unknown key '{section}.{key}' in {path}")
            hint = _field_type(section, key)
            values.setdefault(section, {})[key] = _coerce(f"{section}.{key}", value, hint)
    return values


def flag_values(flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sectioned values from flat flags (None means not given)."""
    values: dict[str, dict[str, Any]] = {}
    for key, value in flags.items():
        if value is None:
            continue
        section = FIELD_SECTION[key]
        values.setdefault(section, {})[key] = _coerce(key, value, _field_type(section, key))
    return values


def resolve(*layers: dict[str, dict[str, Any]], base: TrainConfig = TrainConfig()) -> TrainConfig:
    """Apply sectioned layers in order (later wins) on top of `base`, then validate."""
    merged = {section: asdict(getattr(base, section)) for section in SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            merged[section].update(values)
            # max_steps and epochs are one choice: the layer that sets one clears the other
            if section == "optim":
                if "max_steps" in values and "epochs" not in values:
                    merged[section]["epochs"] = None
                if "epochs" in values and "max_steps" not in values:
                    merged[section]["max_steps"] = None
    return TrainConfig(**{section: cls(**merged[section]) for section, cls in SECTIONS.items()})
