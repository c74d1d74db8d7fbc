"""Training checkpoints that survive a crash, and never unpickle code.

A checkpoint is a directory::

    ckpt-00000123/
        config.json        model name, model config, class names, data set, step, metrics (JSON)
        model.safetensors  the model's weights
        ema.safetensors    the EMA weights, when training keeps an EMA (what evaluation used)
        train_state.pt     optimizer, LR scheduler, RNG states, step, history: tensors and plain
                           Python values only, read back with ``torch.load(weights_only=True)``

``last`` and ``best`` in the run directory are symbolic links to such directories. A new
checkpoint is written in full under a temporary name, renamed into place, and only then is the
link swapped with ``os.replace``, which is atomic: a crash at any moment leaves ``last`` pointing
at a complete checkpoint, the old one or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .models.pretrained import CONFIG, WEIGHTS, write_weights

# A checkpoint is a save_pretrained folder (CONFIG, WEIGHTS) with these beside them.
EMA_WEIGHTS, TRAIN_STATE = "ema.safetensors", "train_state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line that says what to do."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None
    train_state: dict | None

    @property
    def eval_weights(self) -> dict[str, torch.Tensor]:
        """The weights training evaluated: the EMA's when there is one."""
        return self.ema_weights if self.ema_weights is not None else self.weights


def atomic_write(path: Path, text: str) -> None:
    """Write a text file under a temporary name and rename it: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, name: str, meta: dict, model: nn.Module,
                    ema_model: nn.Module | None = None, train_state: dict | None = None,
                    links: tuple[str, ...] = ("last",)) -> Path:
    """Write checkpoint ``run_dir/name`` and point each of ``links`` (e.g. "last", "best") at it."""
    run_dir = Path(run_dir)
    # A directory of this name may exist (a run resumed from an earlier `best` reaches the same
    # step again) and `last` may point at it: never overwrite, take a fresh name.
    base, n = name, 0
    while (run_dir / name).exists():
        n += 1
        name = f"{base}.{n}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    write_weights(model, tmp / WEIGHTS)
    if ema_model is not None:
        write_weights(ema_model, tmp / EMA_WEIGHTS)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    os.replace(tmp, final)
    for link in links:
        tmp_link = run_dir / f".{link}.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(name)
        os.replace(tmp_link, run_dir / link)
    _fsync_dir(run_dir)
    _remove_unreferenced(run_dir)
    return final


def _remove_unreferenced(run_dir: Path) -> None:
    """Delete checkpoint directories that neither ``last`` nor ``best`` points at."""
    keep = {os.readlink(run_dir / link) for link in ("last", "best") if (run_dir / link).is_symlink()}
    for d in run_dir.glob("ckpt-*"):
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: str | Path, with_train_state: bool = True) -> Checkpoint:
    """Read a checkpoint directory (or a run directory, meaning its ``last``) safely.

    Every failure is a :class:`CheckpointError` whose message names the file and the fix.
    """
    path = Path(path)
    if (path / "last").exists() and not (path / CONFIG).exists():
        path = path / "last"
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a checkpoint directory "
                              f"(e.g. RUN_DIR/last or RUN_DIR/best) or a run directory")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{str(path)!r} is not a coatnet checkpoint (no {CONFIG} and {WEIGHTS}); "
                              f"give a directory written by `coatnet train`")
    try:
        meta = json.loads((path / CONFIG).read_text())
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError("no model name")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path / CONFIG)!r} is corrupt ({e}); use another checkpoint") from None
    weights = _read_weights(path / WEIGHTS)
    ema = _read_weights(path / EMA_WEIGHTS) if (path / EMA_WEIGHTS).exists() else None
    state = None
    if with_train_state and (path / TRAIN_STATE).exists():
        try:
            state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or holding objects that weights_only refuses
            raise CheckpointError(f"{str(path / TRAIN_STATE)!r} cannot be read safely ({type(e).__name__}): "
                                  f"corrupt, truncated or not written by coatnet") from None
    return Checkpoint(path, meta, weights, ema, state)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as e:
        raise CheckpointError(f"{str(file)!r} is corrupt or truncated ({type(e).__name__}); "
                              f"use another checkpoint (e.g. RUN_DIR/best)") from None


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint was trained as, with the weights training evaluated."""
    from .models import CoAtNet, CoAtNetConfig, load_weights

    try:
        config = CoAtNetConfig(**checkpoint.meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(checkpoint.path / CONFIG)!r} has no usable model config ({e})") from None
    model = CoAtNet(config)
    load_weights(model, checkpoint.eval_weights)
    return model.eval()
