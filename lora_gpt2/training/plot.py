"""loss.png: train and val loss against step (matplotlib is an optional extra)."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_open
from .metrics import read_metrics

PLOT_HINT = "pip install 'lora-gpt2[plot]' (matplotlib) to get loss.png"


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_loss(metrics_path: Path, png_path: Path, title: str = "") -> bool:
    """Draw the curve; False when there is nothing to draw yet.

    A Figure with its own Agg canvas: no pyplot, so the caller's matplotlib backend and
    figure list are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return False
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8, linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="val", color="tab:orange", marker="o", markersize=3, linewidth=1.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "lora-gpt2 training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png")
    return True
