"""Training configuration: one frozen dataclass per concern, read from TOML and flags.

Precedence: command-line flag > `--config FILE` > built-in defaults. In a TOML file each
concern is a table (`[model]`, `[data]`, `[optim]`, `[run]`); every field name is unique
across tables, so the flag for a field is `--` plus its name with `-` for `_`.
"""

from __future__ import annotations

import enum
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..adapters import variants
from ..config import DEVICES, DTYPES, LoRAConfig, resolve_targets
from .. import chat_template
from ..data.formats import TRAIN_ON, Options
from .loggers import LOGGERS as LOGGER_TABLE

class Resume(str, enum.Enum):
    """`--resume`: no (a new run), yes (continue the run in --out), auto (continue it if it exists)."""

    no = "no"
    yes = "yes"
    auto = "auto"


def resume_mode(value: "bool | str | Resume | None") -> str:
    """The one reading of `--resume` and of `train(resume=...)`: None / False / "no", True / "yes", "auto"."""
    if value is None or value is False:
        return "no"
    if value is True:
        return "yes"
    try:
        return Resume(value).value
    except ValueError:
        raise ValueError(f"resume must be one of {', '.join(m.value for m in Resume)}; got {value!r}") from None


OPTIMIZERS = ("adamw", "adam")
LOGGERS = tuple(LOGGER_TABLE)  # --log choices, besides the metrics and the plot every run writes
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


def setting(default: Any, help: str, *, fixed: bool = False, flags: tuple[str, ...] = (), metavar: str | None = None,
            show_default: bool = True) -> Any:
    """A training setting, declared once: its default, its `--help` line, whether a resumed run must
    keep it (`fixed`: it gives the run its meaning), and its flag's spelling when not `--name`
    (`--name/--no-name` for a switch). `train`'s options, the TOML reader, the resume checks and
    `--print-config` are all derived from these declarations."""
    return field(default=default, metadata={"help": help, "fixed": fixed, "flags": flags, "metavar": metavar,
                                            "show_default": show_default})


@dataclass(frozen=True)
class ModelSettings:
    model: str = setting("gpt2", "Base GPT-2: Hub id (gpt2, gpt2-medium, ...) or local directory.", fixed=True)
    targets: tuple[str, ...] = setting(("qkv_projection", "output_projection", "linear_in", "linear_out"),
                                       "Comma-separated modules or groups: attn, ffn, embeddings, all, ...", fixed=True)
    rank: int = setting(8, "LoRA rank r.", fixed=True)
    alpha: Optional[float] = setting(16.0, "LoRA alpha; scaling = alpha / rank (none: alpha = rank).", fixed=True)
    dropout: float = setting(0.05, "Dropout on the LoRA input path.")
    dtype: str = setting("auto", "Frozen weights: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16, "
                                 "float16 (CUDA).")
    rslora: bool = setting(False, "Rank-stabilised LoRA: scaling = alpha / sqrt(rank).", fixed=True)
    layers: Optional[str] = setting(None, "Adapters in these blocks only: N (the last N), A-B, or A,B,C; embedding "
                                          "and lm_head targets are not affected.", fixed=True)
    variant: str = setting("lora", "The layers' maths: " + variants.describe(variants.VARIANTS) + ".", fixed=True)
    init: str = setting("default", "How the adapter starts: " + variants.describe(variants.INITS)
                        + "; pissa_niter_N: PiSSA by N iterations of randomised SVD. A residual start is saved as "
                          "a rank-2r LoRA of the original weights.", fixed=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", resolve_targets(self.targets))
        if not self.targets:
            raise ValueError("targets must name at least one module to train")
        if not self.model:
            raise ValueError("model must be a Hub id or a checkpoint directory, got ''")
        variants.check(self.lora)  # rank, alpha, dropout, variant and init: where the library checks them
        _choice("dtype", self.dtype, DTYPES)

    @property
    def lora(self) -> LoRAConfig:
        """The library's LoRA settings: `rank` here is `r` there (alpha=None there means alpha = r)."""
        return LoRAConfig(targets=self.targets, r=self.rank, alpha=self.alpha, dropout=self.dropout,
                          rslora=self.rslora, layers=self.layers, variant=self.variant, init=self.init)


@dataclass(frozen=True)
class DataSettings:
    data: str = setting("data/tinyshakespeare", "Text, JSONL or CSV file, or a folder (of text files, or holding "
                                                "train.jsonl); prepared on first use.", fixed=True)
    block_size: int = setting(256, "Context length of each training window.", fixed=True)
    batch_size: int = setting(8, "Windows per micro-batch (per GPU).")
    text_column: Optional[str] = setting(None, "CSV: the column of texts (default: text).", fixed=True,
                                         show_default=False)
    prompt_column: Optional[str] = setting(None, "CSV: the prompt column (default: prompt).", fixed=True,
                                           show_default=False)
    completion_column: Optional[str] = setting(None, "CSV: the completion column (default: completion).", fixed=True,
                                               show_default=False)
    mask_prompt: Optional[bool] = setting(None, "Learn only the completions (default: on for prompt/completion "
                                                "data).", fixed=True, show_default=False)
    packing: bool = setting(False, "Example data: pack several examples per row (each sees only itself) instead "
                                   "of padding each row.")
    chat_template: Optional[str] = setting(None, "Chat data: a Jinja chat template file, or a tokenizer_config.json "
                                                 "holding one (default: lora-gpt2's GPT-2 template).", fixed=True,
                                           show_default=False, metavar="FILE")
    train_on: Optional[str] = setting(None, "Chat data: learn the assistant's turns (assistant, the default) or "
                                            "every token (all).", fixed=True, show_default=False,
                                      metavar="assistant|all")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data must be a text file or a folder, got ''")
        for name in ("text_column", "prompt_column", "completion_column"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must name a CSV column, got ''")
        if self.chat_template == "":
            raise ValueError("chat_template must name a template file, got ''")
        if self.train_on is not None:
            _choice("train_on", self.train_on, TRAIN_ON)
        _positive("block_size", self.block_size)
        _positive("batch_size", self.batch_size)
        if self.batch_size * self.block_size > MAX_MICRO_BATCH_TOKENS:
            raise ValueError(
                f"batch_size x block_size = {self.batch_size * self.block_size:,} tokens per micro-batch is "
                f"more than {MAX_MICRO_BATCH_TOKENS:,}; use --grad-accum for large batches")

    @property
    def options(self) -> Options:
        """How to read the data (CSV columns, the chat template's text): what its preparation depends on."""
        template = chat_template.load(self.chat_template).text if self.chat_template else None
        return Options(self.text_column, self.prompt_column, self.completion_column, template)


@dataclass(frozen=True)
class OptimSettings:
    optimizer: str = setting("adamw", "adamw or adam.", fixed=True)
    lr: float = setting(5e-4, "Peak learning rate.")
    weight_decay: float = setting(0.0, "Weight decay of the LoRA parameters.")
    beta1: float = setting(0.9, "Adam beta1.")
    beta2: float = setting(0.999, "Adam beta2.")
    warmup_steps: int = setting(50, "Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = setting(0.1, "Final learning rate as a fraction of --lr.")
    grad_clip: float = setting(1.0, "Clip the gradient norm (0 disables).")
    lora_plus_ratio: Optional[float] = setting(None, "LoRA+: lora_b learns at this many times --lr (16 is the "
                                                     "paper's choice).", fixed=True)
    grad_accum: int = setting(1, "Micro-batches per optimiser step.")
    max_steps: Optional[int] = setting(1000, "Optimiser steps (instead of --epochs).")
    epochs: Optional[float] = setting(None, "Passes over the train tokens (instead of --max-steps).")

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
    out: str = setting("out/shakespeare", "Run directory for adapters, metrics.jsonl and loss.png.")
    eval_interval: int = setting(100, "Evaluate (and checkpoint) every N steps.")
    eval_batches: int = setting(20, "Batches of validation windows per evaluation.")
    log_interval: int = setting(10, "Write metrics.jsonl every N steps.")
    save_interval: Optional[int] = setting(None, "Also checkpoint last/ every N steps (none: at every "
                                                 "evaluation).")
    save_interval_minutes: Optional[float] = setting(None, "Also checkpoint last/ every M minutes.")
    device: str = setting("auto", "auto, cpu, cuda or mps.")
    seed: int = setting(1337, "Seed of batches and initialisation.")
    compile: bool = setting(False, "torch.compile the model.")
    grad_checkpoint: bool = setting(False, "Recompute each block's activations in backward: less memory, about a "
                                           "third more compute.")
    log: tuple[str, ...] = setting((), "Also log to TensorBoard or W&B (repeatable; needs pip install "
                                       "'lora-gpt2\\[tensorboard]' or '\\[wandb]'). Under torchrun write --logger: "
                                       "its parser takes --log for its --log-dir.", flags=("--log", "--logger"),
                                   metavar="tensorboard|wandb", show_default=False)

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
SETTINGS = {f.name: f for cls in SECTIONS.values() for f in fields(cls)}  # every declaration, in order
# settings that give a run its meaning: a resumed run must keep them (section, key)
FIXED_ON_RESUME = frozenset((FIELD_SECTION[name], name) for name, f in SETTINGS.items() if f.metadata["fixed"])


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
        for key, value in (variants.upgrade(table) if section == "model" else table).items():
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
