"""`lora-gpt2 train` and `lora-gpt2 plot`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .output import LazyProgress, is_terminal, progress, say
from .signals import SIGNAL_EXIT, StopOnSignals

Opt = typer.Option


def _default(key: str) -> str:
    """' (default: X)' for a training setting: flags default to None (so a config file can set
    them), which would leave typer's help without the value actually used."""
    from ..training.config import FIELD_SECTION, TrainConfig

    value = getattr(getattr(TrainConfig(), FIELD_SECTION[key]), key)
    if isinstance(value, tuple):
        value = ",".join(value)
    return f" (default: {'none' if value is None else value})"


def H(text: str, key: str) -> str:  # noqa: N802 - reads as a help string with its default
    return text + _default(key)


@app.command("train")
def train_cmd(
    config: Optional[Path] = Opt(None, "--config", help="TOML file (see configs/); flags override it."),
    model: Optional[str] = Opt(None, help=H("Base GPT-2: Hub id (gpt2, gpt2-medium, ...) or local directory.", "model")),
    data: Optional[str] = Opt(None, help=H("Text, JSONL or CSV file, or a folder (of text files, or holding "
                                           "train.jsonl); prepared on first use.", "data")),
    text_column: Optional[str] = Opt(None, help="CSV: the column of texts (default: text)."),
    prompt_column: Optional[str] = Opt(None, help="CSV: the prompt column (default: prompt)."),
    completion_column: Optional[str] = Opt(None, help="CSV: the completion column (default: completion)."),
    mask_prompt: Optional[bool] = Opt(None, "--mask-prompt/--no-mask-prompt",
                                      help="Learn only the completions (default: on for prompt/completion data)."),
    packing: Optional[bool] = Opt(None, "--packing/--no-packing",
                                  help=H("Example data: pack several examples per row (each sees only itself) "
                                         "instead of padding each row.", "packing")),
    out: Optional[str] = Opt(None, help=H("Run directory for adapters, metrics.jsonl and loss.png.", "out")),
    targets: Optional[str] = Opt(None, help=H("Comma-separated modules or groups: attn, ffn, embeddings, all, ...",
                                              "targets")),
    rank: Optional[int] = Opt(None, help=H("LoRA rank r.", "rank")),
    alpha: Optional[float] = Opt(None, help=H("LoRA alpha; scaling = alpha / rank (none: alpha = rank).", "alpha")),
    dropout: Optional[float] = Opt(None, help=H("Dropout on the LoRA input path.", "dropout")),
    rslora: Optional[bool] = Opt(None, "--rslora/--no-rslora",
                                 help=H("Rank-stabilised LoRA: scaling = alpha / sqrt(rank).", "rslora")),
    dora: Optional[bool] = Opt(None, "--dora/--no-dora",
                               help=H("DoRA: a trained magnitude per output feature times the direction of "
                                      "weight + LoRA update.", "dora")),
    layers: Optional[str] = Opt(None, help=H("Adapters in these blocks only: N (the last N), A-B, or A,B,C; "
                                             "embedding and lm_head targets are not affected.", "layers")),
    lora_plus_ratio: Optional[float] = Opt(None, help=H("LoRA+: lora_b learns at this many times --lr (16 is "
                                                        "the paper's choice).", "lora_plus_ratio")),
    dtype: Optional[str] = Opt(None, help=H("Frozen weights: auto, float32, bfloat16, float16 (CUDA).", "dtype")),
    block_size: Optional[int] = Opt(None, help=H("Context length of each training window.", "block_size")),
    batch_size: Optional[int] = Opt(None, help=H("Windows per micro-batch (per GPU).", "batch_size")),
    grad_accum: Optional[int] = Opt(None, help=H("Micro-batches per optimiser step.", "grad_accum")),
    max_steps: Optional[int] = Opt(None, help=H("Optimiser steps (instead of --epochs).", "max_steps")),
    epochs: Optional[float] = Opt(None, help=H("Passes over the train tokens (instead of --max-steps).", "epochs")),
    optimizer: Optional[str] = Opt(None, help=H("adamw or adam.", "optimizer")),
    lr: Optional[float] = Opt(None, help=H("Peak learning rate.", "lr")),
    warmup_steps: Optional[int] = Opt(None, help=H("Linear warmup steps before the cosine decay.", "warmup_steps")),
    min_lr_ratio: Optional[float] = Opt(None, help=H("Final learning rate as a fraction of --lr.", "min_lr_ratio")),
    weight_decay: Optional[float] = Opt(None, help=H("Weight decay of the LoRA parameters.", "weight_decay")),
    beta1: Optional[float] = Opt(None, help=H("Adam beta1.", "beta1")),
    beta2: Optional[float] = Opt(None, help=H("Adam beta2.", "beta2")),
    grad_clip: Optional[float] = Opt(None, help=H("Clip the gradient norm (0 disables).", "grad_clip")),
    eval_interval: Optional[int] = Opt(None, help=H("Evaluate (and checkpoint) every N steps.", "eval_interval")),
    eval_batches: Optional[int] = Opt(None, help=H("Batches of validation windows per evaluation.", "eval_batches")),
    log_interval: Optional[int] = Opt(None, help=H("Write metrics.jsonl every N steps.", "log_interval")),
    save_interval: Optional[int] = Opt(None, help=H("Also checkpoint last/ every N steps.", "save_interval")),
    save_interval_minutes: Optional[float] = Opt(None, help=H("Also checkpoint last/ every M minutes.",
                                                              "save_interval_minutes")),
    device: Optional[str] = Opt(None, help=H("auto, cpu, cuda or mps.", "device")),
    seed: Optional[int] = Opt(None, help=H("Seed of batches and initialisation.", "seed")),
    compile: Optional[bool] = Opt(None, "--compile/--no-compile", help=H("torch.compile the model.", "compile")),
    grad_checkpoint: Optional[bool] = Opt(None, "--grad-checkpoint/--no-grad-checkpoint",
                                          help=H("Recompute each block's activations in backward: less memory, "
                                                 "about a third more compute.", "grad_checkpoint")),
    log: Optional[list[str]] = Opt(None, "--log", "--logger", metavar="tensorboard|wandb",
                                   help="Also log to TensorBoard or W&B (repeatable; needs "
                                        "pip install 'lora-gpt2\\[tensorboard]' or '\\[wandb]'). Under "
                                        "torchrun write --logger: its parser takes --log for its --log-dir."),
    resume: bool = Opt(False, "--resume", help="Continue the run in --out from its last checkpoint; "
                                                "'--resume auto' starts fresh when --out holds no run."),
    resume_auto: bool = Opt(False, "--resume-auto", hidden=True),  # what main() makes of '--resume auto'

    stop_after: Optional[int] = Opt(None, min=1, help="Checkpoint and stop after N more steps (resume later)."),
    mfu: bool = Opt(False, "--mfu", help="Measure this device's matmul rate at the end and report MFU."),
    print_config: bool = Opt(False, "--print-config", help="Print the resolved config as TOML and exit."),
) -> None:
    """Fine-tune GPT-2 with LoRA; saves adapter-only checkpoints in --out (best/ and last/)."""
    flags = {k: v for k, v in locals().items()
             if k not in ("config", "resume", "resume_auto", "stop_after", "print_config", "mfu") and v not in (None, [])}
    from ..training import config as tc

    mode = "auto" if resume_auto else "yes" if resume else "no"
    if config is not None and config.is_dir():
        raise ValueError(f"--config {config} is a folder; give a TOML file")
    layers = [tc.read_toml(config)] if config else []
    base = tc.TrainConfig()
    out_dir = flags.get("out") or _file_out(layers) or base.run.out
    if mode == "yes" or (mode == "auto" and (Path(out_dir) / "config.json").is_file()):
        base = _saved_config(out_dir)
    resolved = tc.resolve(*layers, tc.flag_values(flags), base=base)
    if print_config:
        print(resolved.to_toml(), end="")
        return
    _ensure_default_data(resolved)
    view = TrainView(resolved.run.log_interval)
    from ..training import train

    with StopOnSignals() as stopper, LazyProgress("prepare", "examples") as preparing:
        result = train(resolved, resume=mode, subscribers=[view], should_stop=stopper.requested,
                       stop_after=stop_after, measure_mfu=mfu, prepare_progress=preparing)
    if result.interrupted and os.environ.get("RANK", "0") == "0":
        say(f"stopped at step {result.step}/{result.max_steps}; continue with: "
            f"lora-gpt2 train --out {resolved.run.out} --resume")
    if stopper.requested() is not None:
        # the shell's code for the signal (130 for Ctrl-C), so `train && next` stops too
        raise typer.Exit(SIGNAL_EXIT[stopper.requested()])


def _file_out(layers) -> str | None:
    return next((layer.get("run", {}).get("out") for layer in layers if layer.get("run", {}).get("out")), None)


def _saved_config(out: str):
    from ..training import config as tc
    from ..training.run_dir import RUN_CONFIG

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

    from .data_cmd import DEFAULT_DATA_DIR, download_data_cmd

    data = Path(config.data.data)
    if os.environ.get("RANK", "0") != "0" or data.exists() or config.data.data != DEFAULT_DATA_DIR:
        return
    say(f"{data} not found: downloading Tiny Shakespeare first")
    download_data_cmd(data_dir=data, url=None, sha256=None, force=False, retries=4, timeout=1800.0)


class TrainView:
    """The terminal view of a run (a training subscriber): a tqdm bar on a terminal, a plain line
    every --log-interval steps elsewhere."""

    def __init__(self, log_interval: int) -> None:
        self.log_interval = log_interval
        self.bar = None

    def handle(self, event) -> None:
        getattr(self, f"on_{event.kind}")(event)

    def write(self, text: str) -> None:
        if self.bar is not None and is_terminal():
            self.bar.write(text)
        else:
            say(text)

    def on_started(self, e) -> None:
        share = 100 * e.trainable / e.total
        say(f"model {e.model}: {e.total:,} parameters, {e.trainable:,} trainable (LoRA, {share:.3f}%)")
        choice = f" ({e.dtype_choice})" if e.dtype_choice.startswith("auto") else ""
        say(f"device {e.device} x{e.world_size}, dtype {e.dtype}{choice}, "
            f"{e.tokens_per_step:,} tokens per step, steps {e.step}->{e.max_steps}, out {e.out}")
        if is_terminal():
            self.bar = progress(e.max_steps, "train", unit="step", initial=e.step)

    def on_stepped(self, e) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {e.loss:.4f} lr {e.lr:.2e} grad {e.grad_norm:.3g} "
                                     f"{e.tokens_per_s:,.0f} tok/s", refresh=False)
        elif e.step % self.log_interval == 0:
            say(f"step {e.step} | loss {e.loss:.4f} | lr {e.lr:.2e} | grad norm {e.grad_norm:.3g} | "
                f"{e.tokens_per_s:,.0f} tok/s")

    def on_evaluated(self, e) -> None:
        import math

        self.write(f"step {e.step}: val loss {e.val_loss:.4f} (ppl {math.exp(min(e.val_loss, 50)):.2f})"
                   + (" best" if e.best else ""))

    def on_logged(self, e) -> None:
        pass  # metrics.jsonl has it

    def on_saved(self, e) -> None:
        pass  # every evaluation saves; the end summary says where

    def on_notice(self, e) -> None:
        self.write(e.message)

    def on_finished(self, e) -> None:
        result = e.result
        if self.bar is not None:
            self.bar.close()
        best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
        speed = f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""
        mfu = f", MFU {100 * result.mfu:.0f}% of this device's dense matmul rate" if result.mfu else ""
        say(f"done: step {result.step}/{result.max_steps} in {result.seconds:.1f}s{speed}{mfu}, best val loss {best}")
        say(f"adapters: {result.out / 'best'} (best val), {result.out / 'last'} (last step, resumable); "
            f"metrics: {result.out / 'metrics.jsonl'}")


@app.command("plot")
def plot_cmd(run_dir: Path = typer.Argument(..., help="A training run directory (holding metrics.jsonl).")) -> None:
    """Redraw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""
    from ..training.plot import PLOT_HINT, draw_loss, plot_available

    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path} not found; is {run_dir} a training run directory?")
    if not plot_available():
        raise ValueError(f"matplotlib is not installed: {PLOT_HINT}")
    if not draw_loss(metrics_path, run_dir / "loss.png"):
        raise ValueError(f"{metrics_path} holds no loss values yet")
    say(f"wrote {run_dir / 'loss.png'}")
