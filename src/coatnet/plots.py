"""Figures of a run: loss and accuracy curves, and a confusion matrix.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so they
work on machines without a display and in many processes at once, and are written to a temporary
name and renamed (``checkpoint.write_atomically``), so a crash never leaves half a PNG, and a write
that fails (a full disk) leaves the old figure and no temporary file.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .checkpoint import write_atomically
from .text import printable


def save_figure(fig: Figure, path: str | Path, tight: bool = False) -> None:
    """``tight``: for labels whose width the layout cannot know (class names), the image widens to them
    instead of cutting them off, at the cost of a second drawing (a curves figure, redrawn each epoch, has
    fixed labels, which its constrained layout keeps inside)."""
    path = Path(path)
    FigureCanvasAgg(fig)
    # The temporary name keeps the suffix, from which matplotlib takes the format.
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight" if tight else None),
                     tmp=path.with_name(f".{path.stem}.tmp{path.suffix}"))


def plot_curves(history: list[dict], num_classes: int, path: str | Path, smoothed: bool = False,
                mixed: bool = False) -> None:
    """Loss (train, eval) and accuracy (train top-1, eval top-1 and top-5) per epoch; top-5 only with
    more than 5 classes, where it is not 100% whatever the model (as the epoch line). ``smoothed``,
    ``mixed``: whether training's targets were (label smoothing; Mixup or CutMix), as its legend says."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss, acc = fig.subplots(1, 2)
    # Training's loss is against its own targets: above eval's where they are smoothed or mixed, which is said.
    targets = ", ".join(word for word, on in (("smoothed", smoothed), ("mixed", mixed)) if on)
    loss.plot(epochs, [h["train_loss"] for h in history], "o-",
              label=f"train (its {targets} targets)" if targets else "train")
    loss.plot(epochs, [h["eval_loss"] for h in history], "s-", label="eval")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train top-1")
    acc.plot(epochs, [h["top1"] for h in history], "s-", label="eval top-1")
    if num_classes > 5:
        acc.plot(epochs, [h["top5"] for h in history], "^-", label="eval top-5")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, not 1.25; one too
    save_figure(fig, path)


MAX_NAMED_CLASSES = 100  # beyond this, a readable label per row would need a figure of metres


def plot_confusion(matrix, classes: list[str], path: str | Path, title: str = "confusion matrix") -> None:
    """Rows are true classes, columns predictions; counts printed in the cells when they fit.

    The figure and font are sized from the number of classes and the longest name, so that the
    labels of up to :data:`MAX_NAMED_CLASSES` classes neither overlap nor get cut off.
    """
    labels = [printable(str(c)).replace("$", r"\$") for c in classes]  # a name, not matplotlib's $math$
    n = len(labels)
    named = n <= MAX_NAMED_CLASSES
    fontsize = max(6.0, min(10.0, 200 / max(n, 1)))
    cell = 2 * fontsize / 72  # inches per row and column: a line of text and a gap
    side = max(3.0, min(n, MAX_NAMED_CLASSES) * cell)
    # 0.7 em is about the width of the widest lower-case letters; bbox_inches="tight" catches the rest.
    label = max(map(len, labels), default=0) * 0.7 * fontsize / 72 if named else 0
    fig = Figure(figsize=(side + label + 2.5, side + label + 1.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(n) if named else []
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        peak = max(int(matrix.max()), 1)
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=0.8 * fontsize,
                            color="white" if value > peak / 2 else "black")
    save_figure(fig, path, tight=True)
