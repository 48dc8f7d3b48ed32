"""`lora-gpt2 train` and `lora-gpt2 plot`."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .output import is_terminal, progress, say

Opt = typer.Option


@app.command()
def train(
    config: Optional[Path] = Opt(None, "--config", help="TOML file (see configs/); flags override it."),
    model: Optional[str] = Opt(None, help="Base GPT-2: Hub id (gpt2, gpt2-medium, ...) or local directory."),
    data: Optional[str] = Opt(None, help="Text file, or folder holding input.txt (prepared on first use)."),
    out: Optional[str] = Opt(None, help="Run directory for adapters, metrics.jsonl and loss.png."),
    targets: Optional[str] = Opt(None, help="Comma-separated modules or groups: attn, ffn, embeddings, all, ..."),
    rank: Optional[int] = Opt(None, help="LoRA rank r."),
    alpha: Optional[float] = Opt(None, help="LoRA alpha; scaling = alpha / rank."),
    dropout: Optional[float] = Opt(None, help="Dropout on the LoRA input path."),
    dtype: Optional[str] = Opt(None, help="Frozen weights: auto, float32, bfloat16, float16 (CUDA)."),
    block_size: Optional[int] = Opt(None, help="Context length of each training window."),
    batch_size: Optional[int] = Opt(None, help="Windows per micro-batch (per GPU)."),
    grad_accum: Optional[int] = Opt(None, help="Micro-batches per optimiser step."),
    max_steps: Optional[int] = Opt(None, help="Optimiser steps (instead of --epochs)."),
    epochs: Optional[float] = Opt(None, help="Passes over the train tokens (instead of --max-steps)."),
    optimizer: Optional[str] = Opt(None, help="adamw or adam."),
    lr: Optional[float] = Opt(None, help="Peak learning rate."),
    warmup_steps: Optional[int] = Opt(None, help="Linear warmup steps before the cosine decay."),
    min_lr_ratio: Optional[float] = Opt(None, help="Final learning rate as a fraction of --lr."),
    weight_decay: Optional[float] = Opt(None, help="Weight decay of the LoRA parameters."),
    beta1: Optional[float] = Opt(None, help="Adam beta1."),
    beta2: Optional[float] = Opt(None, help="Adam beta2."),
    grad_clip: Optional[float] = Opt(None, help="Clip the gradient norm (0 disables)."),
    eval_interval: Optional[int] = Opt(None, help="Evaluate (and checkpoint) every N steps."),
    eval_batches: Optional[int] = Opt(None, help="Batches of validation windows per evaluation."),
    log_interval: Optional[int] = Opt(None, help="Write metrics.jsonl every N steps."),
    save_interval: Optional[int] = Opt(None, help="Also checkpoint last/ every N steps."),
    device: Optional[str] = Opt(None, help="auto, cpu, cuda or mps."),
    seed: Optional[int] = Opt(None, help="Seed of batches and initialisation."),
    compile: Optional[bool] = Opt(None, "--compile/--no-compile", help="torch.compile the model."),
    resume: bool = Opt(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    stop_after: Optional[int] = Opt(None, min=1, help="Checkpoint and stop after N more steps (resume later)."),
    print_config: bool = Opt(False, "--print-config", help="Print the resolved config as TOML and exit."),
) -> None:
    """Fine-tune GPT-2 with LoRA; saves adapter-only checkpoints in --out (best/ and last/)."""
    flags = {k: v for k, v in locals().items()
             if k not in ("config", "resume", "stop_after", "print_config") and v is not None}
    from .. import train_config as tc

    layers = [tc.read_toml(config)] if config else []
    base = tc.TrainConfig()
    if resume:
        base = _saved_config(flags.get("out") or _file_out(layers) or base.run.out)
    resolved = tc.resolve(*layers, tc.flag_values(flags), base=base)
    if print_config:
        print(resolved.to_toml(), end="")
        return
    _ensure_default_data(resolved)
    view = TrainView(resolved.run.log_interval)
    from ..trainer import train as run_training

    with _StopOnSigint() as stopper:
        result = run_training(resolved, resume=resume, on_event=view.handle,
                              should_stop=stopper.requested, stop_after=stop_after)
    if result.interrupted:
        say(f"stopped at step {result.step}/{result.max_steps}; continue with: "
            f"lora-gpt2 train --out {resolved.run.out} --resume")
        if stopper.requested():
            raise typer.Exit(130)  # the shell's code for Ctrl-C, so `train && next` stops too


def _file_out(layers) -> str | None:
    return next((layer.get("run", {}).get("out") for layer in layers if layer.get("run", {}).get("out")), None)


def _saved_config(out: str):
    from .. import train_config as tc
    from ..trainer import RUN_CONFIG

    path = Path(out) / RUN_CONFIG
    if not path.is_file():
        raise ValueError(f"nothing to resume in {out} (no {RUN_CONFIG}); check --out")
    try:
        saved = json.loads(path.read_text())
        return tc.resolve({s: v for s, v in saved.items() if s in tc.SECTIONS})
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid run config ({exc})") from None


def _ensure_default_data(config) -> None:
    """`lora-gpt2 train` with no data yet: fetch Tiny Shakespeare, as download-data would."""
    import os

    from .data_cmd import DEFAULT_DATA_DIR, download_data

    data = Path(config.data.data)
    if os.environ.get("RANK", "0") != "0" or data.exists() or config.data.data != DEFAULT_DATA_DIR:
        return
    say(f"{data} not found: downloading Tiny Shakespeare first")
    download_data(data_dir=data, url=None, sha256=None, force=False, retries=4)


class _StopOnSigint:
    """First Ctrl-C: finish the step, checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.flag = False

    def requested(self) -> bool:
        return self.flag

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class TrainView:
    """Renders trainer events: a tqdm bar on a terminal, a plain line every N steps elsewhere."""

    def __init__(self, log_interval: int) -> None:
        self.log_interval = log_interval
        self.bar = None
        self.main = True

    def write(self, text: str) -> None:
        if self.bar is not None and is_terminal():
            self.bar.write(text)
        else:
            say(text)

    def handle(self, kind: str, **e) -> None:
        getattr(self, f"on_{kind}")(**e)

    def on_start(self, **e) -> None:
        self.main = e["main"]
        if not self.main:
            return
        share = 100 * e["trainable"] / e["total"]
        say(f"model {e['model']}: {e['total']:,} parameters, {e['trainable']:,} trainable (LoRA, {share:.3f}%)")
        say(f"device {e['device']} x{e['world_size']}, dtype {e['dtype']}, "
            f"{e['tokens_per_step']:,} tokens per step, steps {e['step']}->{e['max_steps']}, out {e['out']}")
        if is_terminal():
            self.bar = progress(e["max_steps"], "train", unit="step", initial=e["step"])

    def on_step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s", refresh=False)
        elif step % self.log_interval == 0:
            say(f"step {step} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s")

    def on_eval(self, step: int, val_loss: float, best: bool) -> None:
        if self.main:
            import math

            self.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})"
                       + (" best" if best else ""))

    def on_checkpoint(self, path, step: int) -> None:
        pass  # every evaluation saves; the end summary says where

    def on_notice(self, message: str) -> None:
        if self.main:
            self.write(message)

    def on_end(self, result, main: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        if not main:
            return
        best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
        speed = f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""
        mfu = f", MFU {100 * result.mfu:.0f}% of this device's dense matmul rate" if result.mfu else ""
        say(f"done: step {result.step}/{result.max_steps} in {result.seconds:.1f}s{speed}{mfu}, best val loss {best}")
        say(f"adapters: {result.out / 'best'} (best val), {result.out / 'last'} (last step, resumable); "
            f"metrics: {result.out / 'metrics.jsonl'}")


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A training run directory (holding metrics.jsonl).")) -> None:
    """Redraw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""
    from ..plot import PLOT_HINT, draw_loss, plot_available

    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path} not found; is {run_dir} a training run directory?")
    if not plot_available():
        raise ValueError(f"matplotlib is not installed: {PLOT_HINT}")
    if not draw_loss(metrics_path, run_dir / "loss.png"):
        raise ValueError(f"{metrics_path} holds no loss values yet")
    say(f"wrote {run_dir / 'loss.png'}")
