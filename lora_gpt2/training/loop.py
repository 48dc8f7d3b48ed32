"""The training loop: steps, evaluations, checkpoints and stops. It announces events (events.py)
to its subscribers and prints nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

from ..checkpoints import adapter_dir as checkpoint
from . import distributed
from ..devices import dtype_name
from ..errors import TrainingStopped
from ..data import mask_prompt_for
from .evaluation import mean_loss
from .flops import lora_training_flops_per_token, measure_matmul_flops
from ..adapters.lora import count_parameters
from .config import TrainConfig, resume_mode
from . import factory, loggers, run_dir
from .events import Evaluated, Event, Finished, Logged, Saved, Started, Stepped, Subscriber, TrainResult
from .subscribers import LossPlot, MetricsLog

class StepStats(NamedTuple):
    loss: float
    counted: int  # targets the loss learned from
    grad_norm: float  # L2 norm of all adapter gradients, before clipping


def grad_norm(params: list[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    """The L2 norm over every gradient (0 when none has one)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return torch.zeros((), device=device)
    return torch.stack(norms).norm()


# should_stop() -> a reason ("SIGTERM", ...) when the run was asked to stop, else None
StopCheck = Callable[[], "str | None"]


class Trainer:
    """Runs a built `factory.Run`: every announcement goes to the subscribers (rank 0 only)."""

    def __init__(self, run: factory.Run, subscribers: Iterable[Subscriber] = ()) -> None:
        self.run_ = run
        self.subscribers: list[Subscriber] = list(subscribers) if run.dist.is_main else []

    def emit(self, event: Event) -> None:
        for subscriber in self.subscribers:
            subscriber.handle(event)

    @property
    def model(self):
        return self.run_.model

    def state(self) -> dict[str, Any]:
        r = self.run_
        return {
            "step": r.step,
            "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(r.device) if r.device.type == "cuda" else None,
            "best_val": r.best_val,
            "last_val": r.last_val,
            "scaler": r.scaler.state_dict() if r.scaler is not None else None,
        }

    def eval_settings(self) -> dict[str, Any]:
        """What `lora-gpt2 eval` needs to reproduce this run's validation numbers, and what
        `generate` needs to know of the data (its kind)."""
        r = self.run_
        c = r.config
        masked = mask_prompt_for(r.prepared, c.data.mask_prompt, c.data.train_on)
        columns = r.prepared.source.options.columns().to_dict()
        return {k: v for k, v in asdict(checkpoint.EvalRecord(
            data=str(Path(c.data.data).resolve()), block_size=c.data.block_size, batch_size=c.data.batch_size,
            eval_batches=c.run.eval_batches, data_kind=r.prepared.kind, data_sha256=r.prepared.info.get("text_sha256"),
            mask_prompt=None if r.prepared.chat else masked,
            train_on=("assistant" if masked else "all") if r.prepared.chat else None, **columns)).items()
            if v is not None}

    def save(self, folder: Path, with_state: bool) -> None:
        r = self.run_
        if not r.dist.is_main:
            return
        # a chat run's template travels with its adapter: every reader renders conversations alike
        template = {"chat_template": r.prepared.source.options.template().record()} if r.prepared.chat else {}
        checkpoint.save_checkpoint(folder, r.model, self.state() if with_state else None,
                                   step=r.step, val_loss=r.last_val, tokens_per_step=r.tokens_per_step,
                                   dtype=dtype_name(r.dtype), dtype_choice=r.dtype_choice, eval=self.eval_settings(),
                                   **template)
        self.emit(Saved(folder, r.step))

    def train_step(self) -> StepStats:
        """One optimiser step over grad_accum micro-batches: its loss, targets counted, gradient norm.

        The loss is the sum over every counted target of the step (all micro-batches, all
        ranks) divided by their number, not a mean of per-micro-batch means, which would weigh
        a target in a short micro-batch more (the accumulation error transformers fixed in
        4.46). DDP averages gradients over ranks, hence the factor world_size.
        """
        r = self.run_
        accum = r.config.optim.grad_accum
        counted = r.batches.counted(r.step)  # the same on every rank: batches are a function of the step
        scale = r.dist.world_size / max(counted, 1)
        total = torch.zeros((), device=r.device)
        for micro in range(accum):
            batch = r.batches.get(r.step, micro).to(r.device, non_blocking=True)
            sync = micro == accum - 1 or not r.dist.enabled
            with r.forward_model.no_sync() if not sync else contextlib.nullcontext():
                loss = r.forward_model(batch.x, targets=batch.y, reduction="sum", segments=batch.segments) * scale
                (r.scaler.scale(loss) if r.scaler else loss).backward()
            total += loss.detach()
        if r.scaler is not None:
            r.scaler.unscale_(r.optimizer)
        params = [p for group in r.optimizer.param_groups for p in group["params"]]  # LoRA+: both groups
        if r.config.optim.grad_clip > 0:  # returns the norm before clipping: what the run is told
            norm = torch.nn.utils.clip_grad_norm_(params, r.config.optim.grad_clip)
        else:
            norm = grad_norm(params, r.device)
        if r.scaler is not None:
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            r.optimizer.step()
        r.scheduler.step()
        r.optimizer.zero_grad(set_to_none=True)
        loss, norm_value = torch.stack([total.float(), norm.float()]).tolist()  # one host sync
        # this rank's share times world_size: the mean over ranks is the step's loss; the
        # gradients (hence their norm) are already the same on every rank
        return StepStats(distributed.mean_all(r.dist, loss), counted, norm_value)

    def _diverged(self, loss: float) -> str:
        r = self.run_
        what = f"loss became {loss} at step {r.step + 1} (--lr {r.config.optim.lr:g}); stopped without saving. "
        saved = run_dir.existing_step(r.out)
        if saved is None:
            return what + "No checkpoint was saved yet: start again with a lower --lr"
        return (what + f"The last good checkpoint is {r.folder.last} (step {saved}): "
                "continue with --resume and a lower --lr")

    def run(self, should_stop: StopCheck = lambda: None, stop_after: int | None = None,
            measure_mfu: bool = False) -> TrainResult:
        r, cfg = self.run_, self.run_.config.run
        start_time = last_save = time.perf_counter()
        lora_count, all_count = count_parameters(r.model)
        self.emit(Started(r.config.model.model, lora_count, all_count, r.tokens_per_step, str(r.device),
                          dtype_name(r.dtype), r.dtype_choice, r.dist.world_size, r.step, r.max_steps, r.out))
        for notice in r.notices:
            self.emit(notice)
        first_step = r.step
        interval_start, interval_tokens, trained_tokens = time.perf_counter(), 0, 0
        stop_reason: str | None = None
        r.forward_model.train()
        while r.step < r.max_steps:
            stats = self.train_step()
            loss, counted = stats.loss, stats.counted
            if not math.isfinite(loss):  # the mean over ranks: every rank stops at this step
                raise TrainingStopped(self._diverged(loss))
            r.step += 1
            interval_tokens += counted
            trained_tokens += counted
            now = time.perf_counter()
            # counted tokens: the targets the loss learned from (padding and masked prompts are not)
            tokens_per_s = interval_tokens / max(now - interval_start, 1e-9)
            lr = r.scheduler.get_last_lr()[0]
            self.emit(Stepped(r.step, loss, lr, tokens_per_s, stats.grad_norm))
            evaluate_now = r.step % cfg.eval_interval == 0 or r.step == r.max_steps
            record: dict[str, Any] = {}
            if evaluate_now or r.step % cfg.log_interval == 0:
                record = {"step": r.step, "train_loss": loss, "lr": lr, "grad_norm": stats.grad_norm,
                          "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(now - start_time, 3)}
                interval_start, interval_tokens = now, 0
            if evaluate_now and should_stop() is None:  # a stop request abandons the evaluation
                self._evaluate(record, should_stop)
            if record:
                self.emit(Logged(record))
            minutes = cfg.save_interval_minutes
            save_now = (evaluate_now or (cfg.save_interval and r.step % cfg.save_interval == 0)
                        or (minutes is not None and time.perf_counter() - last_save >= 60 * minutes))
            requested = should_stop()
            stop = distributed.any_rank(r.dist, requested is not None) or (
                stop_after is not None and r.step - first_step >= stop_after)
            if save_now or stop:
                self.save(r.folder.last, with_state=True)
                last_save = time.perf_counter()
            if stop and r.step < r.max_steps:
                stop_reason = requested  # None: --stop-after, or a request on another rank
                break
        seconds = time.perf_counter() - start_time
        trained = r.step - first_step
        tokens_per_s = trained_tokens / seconds if trained else 0.0
        mfu = self._mfu(tokens_per_s) if measure_mfu else None
        result = TrainResult(r.step, r.max_steps, r.best_val, r.last_val, r.out, r.step < r.max_steps, seconds,
                             tokens_per_s, mfu, stop_reason)
        self.emit(Finished(result))
        return result

    def _mfu(self, tokens_per_s: float) -> float | None:
        r = self.run_
        if not tokens_per_s:
            return None
        per_token = lora_training_flops_per_token(r.model.config, r.config.data.block_size)
        peak = measure_matmul_flops(r.device, r.dtype)
        return tokens_per_s / r.dist.world_size * per_token / peak  # per device

    def _evaluate(self, record: dict[str, Any], should_stop: StopCheck) -> None:
        r = self.run_
        val = mean_loss(r.model, r.val_windows, r.device, interrupted=lambda: should_stop() is not None)
        if val is None:
            return  # abandoned for a stop request: the step is saved without an evaluation
        r.last_val = val
        improved = r.best_val is None or val < r.best_val
        if improved:
            r.best_val = val
        record.update(step=r.step, val_loss=val, val_ppl=math.exp(min(val, 50)))
        self.emit(Evaluated(r.step, val, improved))
        if improved:
            self.save(r.folder.best, with_state=False)


def default_subscribers(config: TrainConfig, model, notify: Callable[[Event], None]) -> list[Subscriber]:
    """metrics.jsonl and loss.png, which every run writes."""
    out = Path(config.run.out)
    title = (f"{Path(config.model.model).name} + LoRA r={config.model.rank}, "
             f"{', '.join(model.lora_config.targets)}")
    return [MetricsLog(out), LossPlot(out, title, notify)]


def train(config: TrainConfig, *, resume: bool | str = False, subscribers: Iterable[Subscriber] = (),
          should_stop: StopCheck = lambda: None, stop_after: int | None = None,
          measure_mfu: bool = False, prepare_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Run (or resume) a training run as configured; `subscribers` receive its events after the
    run's own (metrics.jsonl, loss.png) and before the --log loggers. `resume`: False/True, or "auto" (resume if there is a run).
    `prepare_progress(done, total)` hears how a first preparation of the data goes.
    """
    mode = resume_mode(resume)
    loggers.check_installed(config.run.log)
    with distributed.process_group(config.run.device) as dist:
        run = factory.build(config, dist, mode, prepare_progress)
        try:
            trainer = Trainer(run)
            trainer.subscribers = (default_subscribers(config, run.model, trainer.emit) + list(subscribers)
                                   + loggers.build(config, trainer.emit) if dist.is_main else [])
            return trainer.run(should_stop, stop_after, measure_mfu)
        finally:
            if run.lock is not None:
                run.lock.release()
