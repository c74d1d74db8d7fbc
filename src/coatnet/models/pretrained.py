"""``model.save_pretrained(DIR)`` and ``coatnet.from_pretrained(DIR)``: a model as a folder.

The folder holds ``config.json`` (the model's name and its :class:`CoAtNetConfig`) and
``model.safetensors``, the layout of a Hugging Face model repository, so that it can be
uploaded as it is (``huggingface_hub.upload_folder``). ``config.json`` uses the keys of a
training checkpoint's, so one reader serves both: :func:`from_pretrained` also takes a
checkpoint directory written by ``coatnet train`` or its run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def write_weights(model: nn.Module, file: Path) -> None:
    """``model``'s state dict as safetensors; it refuses views and shared storage, so contiguous copies."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(file),
              metadata={"format": "pt"})


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a :class:`CoAtNet`) to ``directory``, created if needed; returns the folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is a file; give a folder to write {CONFIG} and {WEIGHTS} into")
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    (directory / CONFIG).write_text(json.dumps({"model": config.name, "config": config.to_dict()}, indent=2))
    write_weights(model, directory / WEIGHTS)
    return directory


def from_pretrained(path: str | Path) -> nn.Module:
    """The model saved in ``path``, in eval mode: a :func:`save_pretrained` folder, a training
    checkpoint (its EMA weights when it kept an EMA: the weights training evaluated) or a run
    directory (its last checkpoint).

    A weights file without a config is not enough to know the network: load it with
    ``create_model(name, pretrained=FILE)``.
    """
    from ..checkpoint import load_checkpoint, model_from_checkpoint  # the folder format, shared with training

    path = Path(path)
    if path.is_file():
        raise ValueError(f"{str(path)!r} is a file; from_pretrained takes a folder ({CONFIG} + {WEIGHTS}). "
                         f"For a weights file use create_model(NAME, pretrained=FILE)")
    return model_from_checkpoint(load_checkpoint(path, with_train_state=False))
