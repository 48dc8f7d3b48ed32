"""The training loop. Quiet: it reports through `on_event(kind, **data)`, the CLI renders.

Events: "start" (summary), "step" (every step), "eval", "checkpoint", "notice", "end".
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint, distributed, metrics
from .atomic import write_text
from .data import TrainBatches, eval_batches, open_tokens
from .errors import CheckpointError, TrainingStopped
from .flops import lora_training_flops_per_token, measure_matmul_flops
from .lora import count_parameters, lora_parameters
from .loss import lm_loss
from .model import GPT2
from .plot import PLOT_HINT, draw_loss, plot_available
from .prepare import ensure_prepared
from .tokenizer import VOCAB_SIZE
from .train_config import TrainConfig
from .weights import load_pretrained

RUN_CONFIG = "config.json"
Events = Callable[..., None]


@dataclass(frozen=True)
class TrainResult:
    step: int
    max_steps: int
    best_val_loss: float | None
    last_val_loss: float | None
    out: Path
    interrupted: bool
    seconds: float
    tokens_per_s: float  # over this session's steps, evaluations and checkpoints included
    mfu: float | None  # model FLOPs / the device's measured dense matmul rate in this dtype


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"dtype float16 needs a CUDA device (got {device.type}); use bfloat16 or float32")
    return dtype


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def existing_run(out: Path) -> int | None:
    """The step of the run already in `out`, if any."""
    checkpoint.recover_checkpoint(out / "last")
    meta = out / "last" / checkpoint.META_FILE
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text()).get("step", 0))
    except (ValueError, json.JSONDecodeError):
        return 0


@torch.no_grad()
def evaluate(model: GPT2, windows, device: torch.device) -> float:
    """Mean next-token loss over the deterministic evaluation windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in windows:
        total += lm_loss(model, x.to(device), y.to(device)).item() * x.size(0)
    model.train(was_training)
    return total / sum(x.size(0) for x, _ in windows)


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool, on_event: Events) -> None:
        self.config = config
        self.emit = on_event
        self.out = Path(config.run.out)
        self.dist = distributed.setup(config.run.device)
        self.device = self.dist.device
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self._prepare_out(resume)
        torch.manual_seed(config.run.seed + self.dist.rank)

        if not self.dist.is_main:
            distributed.barrier(self.dist)  # rank 0 prepares the token files first
        prepared = ensure_prepared(config.data.data)
        if self.dist.is_main:
            distributed.barrier(self.dist)
        self.train_tokens = open_tokens(prepared.train)
        d = config.data
        self.batches = TrainBatches(self.train_tokens, d.batch_size, d.block_size, config.run.seed,
                                    self.dist.rank, self.dist.world_size)
        self.val_windows = eval_batches(open_tokens(prepared.val), d.block_size, d.batch_size,
                                        config.run.eval_batches)

        m = config.model
        self.model = load_pretrained(m.model, targets=m.targets, r=m.rank, alpha=m.alpha,
                                     dropout=m.dropout, dtype=self.dtype, device=self.device)
        if self.model.config.vocab_size < VOCAB_SIZE:
            raise ValueError(f"{m.model} has a vocabulary of {self.model.config.vocab_size} tokens; "
                             f"the GPT-2 tokenizer needs {VOCAB_SIZE}")
        if d.block_size > self.model.config.n_positions:
            raise ValueError(f"block_size {d.block_size} is longer than the model's context "
                             f"of {self.model.config.n_positions}")
        o = config.optim
        self.tokens_per_step = d.batch_size * d.block_size * o.grad_accum * self.dist.world_size
        self.max_steps = o.max_steps or max(1, math.ceil(o.epochs * len(self.train_tokens) / self.tokens_per_step))
        params = list(lora_parameters(self.model).values())
        opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, self.max_steps, o.min_lr_ratio))
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step, self.best_val, self.last_val = 0, None, None
        if resume:
            self._load_resume_state()
        self.forward_model = self._wrap()

    def _prepare_out(self, resume: bool) -> None:
        previous = existing_run(self.out) if self.dist.is_main else None
        if resume and previous is None and self.dist.is_main:
            raise CheckpointError(f"nothing to resume in {self.out} (no last/ checkpoint)")
        if not resume and previous is not None:
            raise ValueError(f"{self.out} already holds a run (at step {previous}); "
                             "pass --resume to continue it, or choose another --out")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / RUN_CONFIG, json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _load_resume_state(self) -> None:
        last = self.out / "last"
        info = checkpoint.read_adapter_info(last)
        if info.base_fingerprint and info.base_fingerprint != self.model.fingerprint:
            raise CheckpointError(f"{last} was trained on base {info.base_fingerprint}, but "
                                  f"{self.config.model.model} is {self.model.fingerprint}")
        checkpoint.load_adapter_tensors(self.model, info)
        state = checkpoint.load_state(last)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.best_val = int(state["step"]), state.get("best_val")
            self.last_val = state.get("last_val")
            torch.set_rng_state(state["rng_cpu"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{last / checkpoint.STATE_FILE} does not fit this run ({exc})") from None
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        if self.dist.rank:  # only rank 0's dropout RNG is saved; the others start afresh
            torch.manual_seed(self.config.run.seed + self.dist.rank + self.step)
        if self.dist.is_main:
            metrics.truncate_after(self.out / "metrics.jsonl", self.step)

    def _wrap(self) -> torch.nn.Module:
        model: torch.nn.Module = self.model
        if self.config.run.compile:
            model = torch.compile(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "best_val": self.best_val,
            "last_val": self.last_val,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def eval_settings(self) -> dict[str, Any]:
        """What `lora-gpt2 eval` needs to reproduce this run's validation numbers."""
        d = self.config.data
        return {"data": str(Path(d.data).resolve()), "block_size": d.block_size,
                "batch_size": d.batch_size, "eval_batches": self.config.run.eval_batches}

    def save(self, name: str, with_state: bool) -> None:
        if not self.dist.is_main:
            return
        checkpoint.save_checkpoint(self.out / name, self.model, self.state() if with_state else None,
                                   step=self.step, val_loss=self.last_val,
                                   tokens_per_step=self.tokens_per_step, eval=self.eval_settings())
        self.emit("checkpoint", path=self.out / name, step=self.step)

    def train_step(self) -> float:
        """One optimiser step over grad_accum micro-batches; returns the mean loss."""
        accum = self.config.optim.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.batches.get(self.step, micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = micro == accum - 1 or not self.dist.enabled
            ctx = self.forward_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss = lm_loss(self.forward_model, x, y) / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.config.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def run(self, should_stop: Callable[[], bool], stop_after: int | None) -> TrainResult:
        start_time = time.perf_counter()
        lora_count, all_count = count_parameters(self.model)
        self.emit("start", model=self.config.model.model, trainable=lora_count, total=all_count,
                  tokens_per_step=self.tokens_per_step, device=str(self.device),
                  dtype=str(self.dtype).removeprefix("torch."), world_size=self.dist.world_size,
                  step=self.step, max_steps=self.max_steps, out=self.out, main=self.dist.is_main)
        if self.dist.is_main and not plot_available():
            self.emit("notice", message=f"no loss.png: {PLOT_HINT}")
        run = self.config.run
        first_step = self.step
        interval_start, interval_steps = time.perf_counter(), 0
        interrupted = False
        self.forward_model.train()
        while self.step < self.max_steps:
            loss = self.train_step()
            if distributed.any_rank(self.dist, not math.isfinite(loss)):
                raise TrainingStopped(
                    f"loss became {loss} at step {self.step + 1}; stopped without saving. "
                    f"The last good checkpoint is {self.out / 'last'}")
            self.step += 1
            interval_steps += 1
            now = time.perf_counter()
            tokens_per_s = interval_steps * self.tokens_per_step / max(now - interval_start, 1e-9)
            lr = self.scheduler.get_last_lr()[0]
            self.emit("step", step=self.step, loss=loss, lr=lr, tokens_per_s=tokens_per_s)
            record: dict[str, Any] = {}
            evaluate_now = self.step % run.eval_interval == 0 or self.step == self.max_steps
            if evaluate_now or self.step % run.log_interval == 0:
                record = {"step": self.step, "train_loss": loss, "lr": lr,
                          "tokens_per_s": round(tokens_per_s, 1),
                          "elapsed_s": round(now - start_time, 3)}
                interval_start, interval_steps = now, 0
            if evaluate_now:
                self._evaluate(record)
            if record and self.dist.is_main:
                metrics.append(self.out / "metrics.jsonl", record)
                if evaluate_now:
                    self._plot()
            save_now = evaluate_now or (run.save_interval and self.step % run.save_interval == 0)
            stop = distributed.any_rank(self.dist, should_stop()) or (
                stop_after is not None and self.step - first_step >= stop_after)
            if save_now or stop:
                self.save("last", with_state=True)
            if stop and self.step < self.max_steps:
                interrupted = True
                break
        seconds = time.perf_counter() - start_time
        trained = self.step - first_step
        tokens_per_s = trained * self.tokens_per_step / seconds if trained else 0.0
        result = TrainResult(self.step, self.max_steps, self.best_val, self.last_val, self.out,
                             interrupted, seconds, tokens_per_s, self._mfu(tokens_per_s))
        self.emit("end", result=result, main=self.dist.is_main)
        distributed.teardown(self.dist)
        return result

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not tokens_per_s or not self.dist.is_main:
            return None
        per_token = lora_training_flops_per_token(self.model.config, self.config.data.block_size)
        peak = measure_matmul_flops(self.device, self.dtype)
        return tokens_per_s / self.dist.world_size * per_token / peak  # per device

    def _evaluate(self, record: dict[str, Any]) -> None:
        val = evaluate(self.model, self.val_windows, self.device)
        self.last_val = val
        improved = self.best_val is None or val < self.best_val
        if improved:
            self.best_val = val
        record.update(step=self.step, val_loss=val, val_ppl=math.exp(min(val, 50)))
        self.emit("eval", step=self.step, val_loss=val, best=improved)
        if improved:
            self.save("best", with_state=False)

    def _plot(self) -> None:
        if plot_available():
            draw_loss(self.out / "metrics.jsonl", self.out / "loss.png",
                      title=f"{Path(self.config.model.model).name} + LoRA r={self.config.model.rank}, "
                            f"{', '.join(self.model.lora_config.targets)}")


def train(config: TrainConfig, *, resume: bool = False, on_event: Events = lambda kind, **kw: None,
          should_stop: Callable[[], bool] = lambda: False, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a training run as configured; see the module docstring for events."""
    return Trainer(config, resume=resume, on_event=on_event).run(should_stop, stop_after)
