"""Figures of a run: loss and accuracy curves, and a confusion matrix.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so they
work on machines without a display and in many processes at once, and are written to a temporary
name and renamed, so a crash never leaves half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Loss (train, eval) and accuracy (train top-1, eval top-1 and top-5) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss, acc = fig.subplots(1, 2)
    loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss.plot(epochs, [h["eval_loss"] for h in history], "s-", label="eval")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train top-1")
    acc.plot(epochs, [h["top1"] for h in history], "s-", label="eval top-1")
    acc.plot(epochs, [h["top5"] for h in history], "^-", label="eval top-5")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_confusion(matrix, classes: list[str], path: str | Path, title: str = "confusion matrix") -> None:
    """Rows are true classes, columns predictions; counts printed in the cells when they fit."""
    n = len(classes)
    size = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(size, size * 0.9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(n) if n <= 50 else []
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90 if n > 10 else 0)
    ax.set_yticks(ticks, [classes[i] for i in ticks])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        peak = max(int(matrix.max()), 1)
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if value > peak / 2 else "black")
    save_figure(fig, path)
