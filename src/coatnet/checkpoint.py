"""Training checkpoints that survive a crash, and never unpickle code.

A checkpoint is a model folder (``coatnet.models.folder``) with the training state beside it::

    ckpt-00000123/
        config.json        model name, model config, class names, data set, step, metrics (JSON)
        model.safetensors  the model's weights
        ema.safetensors    the EMA weights, when training keeps an EMA (what evaluation used)
        train_state.pt     optimizer, LR scheduler, RNG states, step, history: tensors and plain
                           Python values only, read back with ``torch.load(weights_only=True)``

so ``coatnet.from_pretrained`` and ``create_model(pretrained=...)`` read it as they read any model
folder. ``last`` and ``best`` in the run directory are symbolic links to such directories. A new
checkpoint is written in full under a temporary name, renamed into place, and only then is the
link swapped with ``os.replace``, which is atomic: a crash at any moment leaves ``last`` pointing
at a complete checkpoint, the old one or the new one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .models.folder import ModelFolder, ModelFolderError, read_model_folder, write_model_folder

TRAIN_STATE = "train_state.pt"


class CheckpointError(ModelFolderError):
    """A checkpoint that cannot be used; the message is one line that says what to do."""


@dataclass
class Checkpoint(ModelFolder):
    train_state: dict | None = None


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
    write_model_folder(tmp, meta, model, ema_model)
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

    Every failure is a ``ValueError`` whose message names the file and the fix.
    """
    folder = read_model_folder(path)
    state = None
    if with_train_state and (folder.path / TRAIN_STATE).exists():
        try:
            state = torch.load(folder.path / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or holding objects that weights_only refuses
            raise CheckpointError(f"{str(folder.path / TRAIN_STATE)!r} cannot be read safely ({type(e).__name__}): "
                                  f"corrupt, truncated or not written by coatnet") from None
    return Checkpoint(**vars(folder), train_state=state)
