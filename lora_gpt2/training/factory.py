"""Build the pieces of a run: the folder (locked, checked), data, model, optimiser, resumed state.

Nothing in the run folder changes until every check has passed: a refused `--resume` or a
wrong setting leaves the run exactly as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed, metrics
from .. import allocator
from ..checkpoints import adapter_dir as checkpoint
from ..data import Prepared, ensure_prepared, eval_batches, mask_prompt_for, train_batches
from ..devices import dtype_choice as dtype_choice_for
from ..errors import CheckpointError
from ..adapters.lora import fast_parameters, lora_parameters
from ..model.gpt2 import GPT2
from ..runs import RunFolder
from ..tokenizer import VOCAB_SIZE
from .config import FIXED_ON_RESUME, TrainConfig, resume_mode
from ..checkpoints.hf import load_pretrained
from . import run_dir
from .events import Notice
from .optim import apply_settings, build_optimizer, build_scheduler



@dataclass
class Run:
    """Everything the loop needs, built and checked."""

    config: TrainConfig
    dist: distributed.Dist
    dtype: torch.dtype
    out: Path
    model: GPT2
    forward_model: torch.nn.Module  # the model as the step calls it (compiled, DDP-wrapped)
    batches: Any  # data.TrainBatches (windows of a stream) or data.ExampleBatches
    val_windows: list
    prepared: Prepared
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    tokens_per_step: int
    max_steps: int
    step: int = 0
    best_val: float | None = None
    last_val: float | None = None
    notices: list[Notice] = field(default_factory=list)
    lock: run_dir.RunLock | None = None
    dtype_choice: str = "asked for"  # or "auto: <why>"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out)


def build(config: TrainConfig, dist: distributed.Dist, resume: str,
          prepare_progress: Callable[[int, int], None] | None = None) -> Run:
    """A ready run; `resume` as `config.resume_mode` reads it ("auto": resume when the folder holds a run)."""
    resume = resume_mode(resume)
    out = Path(config.run.out)
    lock = None
    if dist.is_main:
        lock = run_dir.RunLock(out).acquire()
    try:
        run = _build(config, dist, resume, out, prepare_progress)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise
    run.lock = lock
    return run


def _build(config: TrainConfig, dist: distributed.Dist, resume: str, out: Path, prepare_progress) -> Run:
    notices: list[Notice] = []
    if dist.is_main:
        run_dir.recover(out)
        previous = run_dir.existing_step(out)
        resuming = resume == "yes" or (resume == "auto" and previous is not None)
        if resuming and previous is None:
            raise CheckpointError(f"nothing to resume in {out} (no last/ checkpoint)")
        if not resuming and previous is not None:
            raise ValueError(f"{out} already holds a run (at step {previous}); "
                             "pass --resume to continue it, or choose another --out")
        if resuming:
            notices += _check_resume(out, config)
    torch.manual_seed(config.run.seed + dist.rank)
    if not dist.is_main:
        distributed.barrier(dist)  # rank 0 checks the folder and prepares the token files first
        resuming = resume == "yes" or (resume == "auto" and run_dir.existing_step(out) is not None)
    prepared = ensure_prepared(config.data.data, config.data.options, progress=prepare_progress)
    if dist.is_main:
        distributed.barrier(dist)
    mask_prompt = mask_prompt_for(prepared, config.data.mask_prompt, config.data.train_on)

    d, o = config.data, config.optim
    if dist.device.type == "cpu":
        allocator.return_large_frees()  # activations' memory goes back when freed (allocator.py)
    dtype, dtype_choice = dtype_choice_for(config.model.dtype, dist.device)
    # a resumed run starts its layers from last/ (a residual init must not decompose again)
    last = checkpoint.read_checkpoint(RunFolder(out).last) if resuming else None
    if last is not None:
        _check_same_data(out, last, prepared)
    model = load_pretrained(config.model.model, lora=config.model.lora, dtype=dtype, device=dist.device,
                            adapter=last.tensors if last else None,
                            adapter_source=str(RunFolder(out).last / checkpoint.ADAPTER_FILE))
    if model.config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"{config.model.model} has a vocabulary of {model.config.vocab_size} tokens; "
                         f"the GPT-2 tokenizer needs {VOCAB_SIZE}")
    model.grad_checkpoint = config.run.grad_checkpoint
    if d.block_size > model.config.n_positions:
        raise ValueError(f"block_size {d.block_size} is longer than the model's context "
                         f"of {model.config.n_positions}")
    batches = train_batches(prepared, batch_size=d.batch_size, block_size=d.block_size, seed=config.run.seed,
                            mask_prompt=mask_prompt, rank=dist.rank, world_size=dist.world_size, accum=o.grad_accum,
                            packing=d.packing)
    _check_token_ids(batches.tokens, prepared.train, model.config.vocab_size)
    val_windows = eval_batches(prepared, block_size=d.block_size, batch_size=d.batch_size,
                               max_batches=config.run.eval_batches, mask_prompt=mask_prompt)
    rows_per_step = d.batch_size * o.grad_accum * dist.world_size
    tokens_per_step = rows_per_step * d.block_size  # at most, for example data (padding is not counted)
    if o.max_steps:
        max_steps = o.max_steps
    elif prepared.layout == "examples":  # an epoch is every example once
        max_steps = max(1, math.ceil(o.epochs * batches.epoch_rows() / rows_per_step))
    else:  # an epoch is as many tokens as the train split holds
        max_steps = max(1, math.ceil(o.epochs * len(batches.tokens) / tokens_per_step))
    if prepared.layout == "examples" and batches.truncated():
        notices.append(Notice(_truncation(batches, prepared, d.block_size)))
    optimizer = build_optimizer(list(lora_parameters(model).values()), o, fast_parameters(model))
    scheduler = build_scheduler(optimizer, o, max_steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    run = Run(config, dist, dtype, out, model, model, batches, val_windows, prepared, optimizer, scheduler, scaler,
              tokens_per_step, max_steps, notices=notices, dtype_choice=dtype_choice)
    if resuming:
        _load_state(run, last)
        if run.step >= max_steps:
            raise ValueError(f"nothing left to train: {out} is at step {run.step} and max_steps is {max_steps}; "
                             "pass a larger --max-steps (or --epochs)")
    run.forward_model = _wrap(model, config, dist)
    if dist.is_main:  # every check has passed: only now does the folder change
        if resuming:
            metrics.truncate_after(RunFolder(out).metrics, run.step)
        else:
            run_dir.clear_orphans(out)
        run_dir.write_run_config(out, config.to_dict())
    return run


def _same(section: str, key: str, a: Any, b: Any) -> bool:
    if (section, key) in (("data", "data"), ("model", "model")) and isinstance(a, str) and isinstance(b, str):
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        if pa.exists() and pb.exists():
            return pa.resolve() == pb.resolve()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _check_resume(out: Path, config: TrainConfig) -> list[Notice]:
    """Refuse a change of meaning (naming each setting); announce the changes that may be made."""
    saved = run_dir.read_run_config(out)
    if saved is None:
        return []
    new = config.to_dict()
    refused, changed = [], []
    for section, values in new.items():
        old_values = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in values.items():
            if key not in old_values or _same(section, key, old_values[key], value):
                continue
            (refused if (section, key) in FIXED_ON_RESUME else changed).append((key, old_values[key], value))
    if refused:
        key, old, value = refused[0]
        more = f" (and {', '.join(k for k, _, _ in refused[1:])})" if len(refused) > 1 else ""
        raise ValueError(f"cannot resume {out} with {key} {_show(value)}: the run was trained with "
                         f"{key} {_show(old)}{more}; start a new run with another --out instead")
    if not changed:
        return []
    return [Notice("resuming with changed settings: "
                   + ", ".join(f"{key} {_show(old)} -> {_show(value)}" for key, old, value in changed))]


def _check_same_data(out: Path, last: checkpoint.Checkpoint, prepared: Prepared) -> None:
    """The data's content is part of a run's meaning, as its path is (runs before 0.3 did not record it)."""
    then, now = (last.info.meta.get("eval") or {}).get("data_sha256"), prepared.info.get("text_sha256")
    if then and now and then != now:
        raise ValueError(f"cannot resume {out}: {prepared.source.path} changed since the run began (sha256 "
                         f"{then[:16]} then, {now[:16]} now); put the data back, or start a new run with another "
                         "--out")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _truncation(batches, prepared: Prepared, block_size: int) -> str:
    longer = f"{batches.truncated():,} of {len(batches.index):,} train"
    if prepared.chat:
        return (f"{longer} conversations are longer than --block-size {block_size} + 1 tokens: "
                f"{batches.dropped_messages():,} of their earliest messages are dropped (a leading system message "
                "and the last assistant answer are kept)")
    return (f"{longer} examples are longer than --block-size {block_size} + 1 tokens: their prompts are cut "
            "from the left (then their ends)")


def _check_token_ids(tokens: np.ndarray, path: Path, vocab_size: int) -> None:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path} holds token id {int(tokens.max())}, beyond the model's vocabulary of "
                         f"{vocab_size}; prepare the data again (delete its meta.json)")


def _load_state(run: Run, ckpt: checkpoint.Checkpoint) -> None:
    last = ckpt.path
    if ckpt.info.base_fingerprint and ckpt.info.base_fingerprint != run.model.fingerprint:
        raise CheckpointError(f"{last} was trained on base {ckpt.info.base_fingerprint}, but "
                              f"{run.config.model.model} is {run.model.fingerprint}")
    state = checkpoint.load_state(last)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.step, run.best_val = int(state["step"]), state.get("best_val")
        run.last_val = state.get("last_val")
        torch.set_rng_state(state["rng_cpu"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{last / checkpoint.STATE_FILE} does not fit this run ({exc})") from None
    apply_settings(run.optimizer, run.scheduler, run.config.optim)
    if state.get("rng_cuda") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], run.device)
    if run.dist.rank:  # only rank 0's dropout RNG is saved; the others start afresh
        torch.manual_seed(run.config.run.seed + run.dist.rank + run.step)


def _wrap(model: GPT2, config: TrainConfig, dist: distributed.Dist) -> torch.nn.Module:
    wrapped: torch.nn.Module = model
    if config.run.compile:
        wrapped = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=ids)
    return wrapped
