"""`lora-gpt2 train` and `lora-gpt2 plot`."""

from __future__ import annotations

import inspect
import os
import types
import typing
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .output import LazyProgress, is_terminal, progress, say
from .signals import SIGNAL_EXIT, StopOnSignals
from ..runs import RunFolder
from ..training.config import Resume

Opt = typer.Option


def _default_text(value) -> str:
    """' (default: X)': flags default to None (so a config file can set them), which would leave
    typer's help without the value actually used."""
    if isinstance(value, tuple):
        value = ",".join(value)
    return f" (default: {'none' if value is None else value})"


def _setting_options() -> list[inspect.Parameter]:
    """One typer option per training setting, read from its declaration (training/config.py):
    `--name` (a switch: `--name/--no-name`), its help with the default in force, None when not
    given so that `--config` and the saved run can set it."""
    from ..training.config import FIELD_SECTION, SECTIONS, SETTINGS, TrainConfig

    defaults = TrainConfig()
    params = []
    for name, declared in SETTINGS.items():
        meta, flag = declared.metadata, "--" + name.replace("_", "-")
        hint = typing.get_type_hints(SECTIONS[FIELD_SECTION[name]])[name]
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
        decls = meta["flags"] or ((f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,))
        if typing.get_origin(kind) is tuple:  # a list: repeated flags, or one comma-separated value
            kind = list[str] if meta["flags"] else str
        text = meta["help"]
        if meta["show_default"]:
            text += _default_text(getattr(getattr(defaults, FIELD_SECTION[name]), name))
        option = Opt(None, *decls, help=text, metavar=meta["metavar"])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
    return params


def train_cmd(
    config: Optional[Path] = Opt(None, "--config", help="TOML file (see configs/); flags override it."),
    resume: Optional[Resume] = Opt(None, "--resume", metavar="[yes|auto|no]",
                                   help="Continue the run in --out from its last checkpoint (--resume alone is "
                                        "yes); auto starts fresh when --out holds no run."),
    stop_after: Optional[int] = Opt(None, min=1, help="Checkpoint and stop after N more steps (resume later)."),
    mfu: bool = Opt(False, "--mfu", help="Measure this device's matmul rate at the end and report MFU."),
    print_config: bool = Opt(False, "--print-config", help="Print the resolved config as TOML and exit."),
    dora: Optional[bool] = Opt(None, "--dora/--no-dora", hidden=True),  # 0.2's spelling of --variant
    **settings,
) -> None:
    """Fine-tune GPT-2 with LoRA; saves adapter-only checkpoints in --out (best/ and last/)."""
    from ..adapters import variants
    from ..training import config as tc

    flags = variants.upgrade({k: v for k, v in {**settings, "dora": dora}.items() if v not in (None, [])})
    mode = tc.resume_mode(resume)
    if config is not None and config.is_dir():
        raise ValueError(f"--config {config} is a folder; give a TOML file")
    layers = [tc.read_toml(config)] if config else []
    base = tc.TrainConfig()
    out_dir = flags.get("out") or _file_out(layers) or base.run.out
    if mode == "yes" or (mode == "auto" and RunFolder(out_dir).config.is_file()):
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


def _declare_train_cmd() -> None:
    """Register `train` with its own options plus one per declared setting."""
    hints = typing.get_type_hints(train_cmd)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(train_cmd).parameters.values()
           if p.kind is not p.VAR_KEYWORD]
    train_cmd.__signature__ = inspect.Signature(own + _setting_options(), return_annotation=None)
    train_cmd.__annotations__ = {p.name: p.annotation for p in train_cmd.__signature__.parameters.values()}
    app.command("train")(train_cmd)


_declare_train_cmd()


def _file_out(layers) -> str | None:
    return next((layer.get("run", {}).get("out") for layer in layers if layer.get("run", {}).get("out")), None)


def _saved_config(out: str):
    from ..training import config as tc
    from ..runs import RunFolder
    from ..training.run_dir import read_run_config

    saved = read_run_config(Path(out))
    if saved is None:
        raise ValueError(f"nothing to resume in {out} (no {RunFolder(out).config.name}); check --out")
    try:
        return tc.resolve({s: v for s, v in saved.items() if s in tc.SECTIONS})
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"{RunFolder(out).config} is not a valid run config ({exc})") from None


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
        run = RunFolder(result.out)
        say(f"adapters: {run.best} (best val), {run.last} (last step, resumable); metrics: {run.metrics}")


@app.command("plot")
def plot_cmd(run_dir: Path = typer.Argument(..., help="A training run directory (holding metrics.jsonl).")) -> None:
    """Redraw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""
    from ..training.plot import PLOT_HINT, draw_loss, plot_available

    run = RunFolder(run_dir)
    metrics_path = run.metrics
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path} not found; is {run_dir} a training run directory?")
    if not plot_available():
        raise ValueError(f"matplotlib is not installed: {PLOT_HINT}")
    if not draw_loss(metrics_path, run.plot):
        raise ValueError(f"{metrics_path} holds no loss values yet")
    say(f"wrote {run.plot}")
