"""The model folder: a model as ``config.json`` + ``model.safetensors``.

The layout of a Hugging Face model repository, so that a folder can be uploaded as it is
(``huggingface_hub.upload_folder``). ``config.json`` holds ``"model"`` (the registered name),
``"config"`` (the :class:`~coatnet.models.coatnet.CoAtNetConfig`), ``"pretrained_cfg"`` (how images
are prepared for the weights, and the class names:
:class:`~coatnet.models.preprocessing.PretrainedCfg`), and whatever else its writer records
(training adds the data set, the step and its settings). ``ema.safetensors``, when present, holds
the weights to use: the exponential moving average that training evaluated. Training
checkpoints are such folders with a training state beside them (``coatnet.checkpoint``), and a
run directory stands for its ``last`` checkpoint.

This module reads and writes files only; it knows nothing of the network, so both the model
code and the training code build on it. It also reads what earlier versions wrote: version 1's
flat config (:func:`config_from_version_1`) and its weight names (:func:`upgrade_state_dict`).
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..text import json_text
from .preprocessing import PretrainedCfg, imagenet_class_names

CONFIG, WEIGHTS, EMA_WEIGHTS = "config.json", "model.safetensors", "ema.safetensors"
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # beside timm's config.json, in timm's repositories
TRAIN_STATE = "train_state.pt"  # beside a training checkpoint's model folder (coatnet.checkpoint)
# A run directory's checkpoints, as training names them: ``ckpt-`` and the step, ``.N`` when that name was taken
CHECKPOINT_NAME = re.compile(r"ckpt-\d{8}(\.\d+)?")
LOCK = ".lock"  # held by the one process that writes the run directory


class ModelFolderError(ValueError):
    """A folder that cannot be used; the message is one line that says what to do."""


@dataclass
class ModelFolder:
    path: Path
    meta: dict  # config.json
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None

    @property
    def eval_weights(self) -> dict[str, torch.Tensor]:
        """The weights to use: the EMA's when there is one."""
        return self.ema_weights if self.ema_weights is not None else self.weights


def write_weights(model: nn.Module | dict[str, torch.Tensor], file: Path) -> None:
    """A model's state dict (or a state dict) as safetensors; it refuses views and shared storage, so
    contiguous copies."""
    state = model if isinstance(model, dict) else model.state_dict()
    # safetensors writes a new file readable by its owner only (0600); it gets the permissions any other
    # file written here gets (the umask's, as config.json), or keeps those of the file it replaces.
    file.touch()
    mode = stat.S_IMODE(file.stat().st_mode)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})
    os.chmod(file, mode)


def write_model_folder(directory: Path, meta: dict, model: nn.Module | dict,
                       ema_model: nn.Module | dict | None = None) -> None:
    """Write ``config.json`` (``meta``), the weights and, with ``ema_model``, the EMA weights into ``directory``."""
    (directory / CONFIG).write_text(json_text(meta, indent=2))
    write_weights(model, directory / WEIGHTS)
    if ema_model is not None:
        write_weights(ema_model, directory / EMA_WEIGHTS)
    else:  # an older folder's EMA weights left here would be read in place of these (ModelFolder.eval_weights)
        (directory / EMA_WEIGHTS).unlink(missing_ok=True)


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a ``CoAtNet``) to ``directory``, created if needed; returns the folder."""
    directory = Path(directory)
    if not hasattr(model, "forward_head"):  # a feature extractor: no config of its own to rebuild it from
        raise ModelFolderError(f"save_pretrained saves a classifier network; for a {type(model).__name__} save the "
                               f"model it was made from, or its state_dict")
    if directory.exists() and not directory.is_dir():
        raise ModelFolderError(f"{str(directory)!r} is a file; give a folder to write {CONFIG} and {WEIGHTS} into")
    # The folder is read back by building model.config and loading the weights into it: a module
    # swapped in by hand (a new classifier) would not load, or worse, be replaced without a word.
    with torch.device("meta"):
        expected = {k: v.shape for k, v in type(model)(model.config).state_dict().items()}
    differ = sorted(k for k, v in model.state_dict().items() if expected.pop(k, None) != v.shape) + sorted(expected)
    if differ:
        raise ModelFolderError(f"the model's weights do not fit model.config ({', '.join(differ[:4])}"
                               f"{' ...' if len(differ) > 4 else ''}): a module replaced by hand, or pruned "
                               f"(prune_intermediate_layers), changes the weights but not the config; for a new "
                               f"classifier use model.reset_classifier(N), for a pruned one save its state_dict")
    # after the check above, which says a pruned model's (unpooled too) is pruned: reset_classifier would not do
    if not model.global_pool:  # the config holds no pooling: read back, the model would pool
        raise ModelFolderError("save_pretrained saves a classifier network, and this one's head was made unpooled "
                               "(global_pool ''): save its state_dict, or reset_classifier(N, 'avg') first")
    refuse_to_replace(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_model_folder(directory, {"model": model.config.name, "config": model.config.to_dict(),
                                   "pretrained_cfg": model.pretrained_cfg.to_dict()}, model)
    return directory


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run or its remains: a ``last`` or ``best`` link (even one whose
    checkpoint is gone; or a copy's folder, holding a checkpoint: a user's own ``best/`` is no run), or a
    checkpoint directory as training names them. What a first save cut off by a crash left (temporary
    names) is no run: a new one starts there, and its first save removes them."""
    links = any((run_dir / link).is_symlink() or (run_dir / link / CONFIG).is_file()
                or (run_dir / link / TRAIN_STATE).is_file() for link in ("last", "best"))
    return links or (run_dir.is_dir() and any(CHECKPOINT_NAME.fullmatch(p.name) for p in run_dir.iterdir()))


def refuse_to_replace(directory: Path) -> None:
    """A model saved over our own model folder replaces it (as Hugging Face's save_pretrained does);
    over what training wrote, or another program's config.json, it would hide or lose them."""
    if holds_a_run(directory):  # the weights would stand for the run's `last` in every command
        raise ModelFolderError(f"{str(directory)!r} holds a training run, whose checkpoints these weights would "
                               f"hide; give a new or empty folder")
    if (directory / TRAIN_STATE).exists():
        raise ModelFolderError(f"{str(directory)!r} is a training checkpoint, whose weights (and EMA) these would "
                               f"replace; give a new or empty folder")
    config = directory / CONFIG
    if config.exists():
        try:
            meta = json.loads(config.read_text())
        except (OSError, ValueError):  # unreadable: not ours either
            meta = None
        if not (isinstance(meta, dict) and "model" in meta and "config" in meta):
            raise ModelFolderError(f"{str(config)!r} is not a coatnet model's and would be replaced; move it, or give "
                                   f"another folder")


def read_pretrained_cfg(folder: ModelFolder) -> PretrainedCfg:
    """The preprocessing recorded in ``config.json``. Folders written before it was recorded hold our
    training runs (our preprocessing at their size, and the class names training recorded) or timm's
    converted ImageNet weights (a 1000-class head without names: ImageNet-1k's)."""
    meta = folder.meta
    if "pretrained_cfg" not in meta:
        size = meta.get("img_size") or min(meta["config"].get("img_size") or (224,))
        names = meta.get("classes") or (imagenet_class_names() if meta["config"].get("num_classes") == 1000 else None)
        meta = meta | {"pretrained_cfg": PretrainedCfg.for_size(size).to_dict() | {"label_names": names}}
    try:
        cfg = PretrainedCfg.from_dict(meta["pretrained_cfg"])
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFolderError(f"{str(folder.path / CONFIG)!r} has an unusable pretrained_cfg ({e}); "
                               f"correct it or use another checkpoint") from None
    outputs = meta["config"].get("num_classes")
    if cfg.label_names is not None and len(cfg.label_names) != outputs:
        raise ModelFolderError(f"{str(folder.path / CONFIG)!r} lists {len(cfg.label_names)} class names but the "
                               f"model has {outputs} outputs; give it one name per output, or use another checkpoint")
    return cfg


def read_model_folder(path: str | Path) -> ModelFolder:
    """Read a model folder, a training checkpoint, or a run directory (its ``last`` checkpoint).

    Every failure is a :class:`ModelFolderError` whose message names the file and the fix.
    """
    path, meta = read_model_meta(path)
    ema = read_weights(path / EMA_WEIGHTS) if (path / EMA_WEIGHTS).exists() else None
    return ModelFolder(path, meta, read_weights(path / WEIGHTS), ema)


def run_last(path: Path) -> Path | None:
    """``path/last`` where ``path`` is a run directory (a ``last`` link, or a copy's folder: cp -L, and
    no model of its own), which stands for that checkpoint; else None."""
    last = path / "last"
    return last if (last.is_symlink() or last.is_dir()) and not (path / CONFIG).exists() else None


def read_model_meta(path: str | Path) -> tuple[Path, dict]:
    """The folder :func:`read_model_folder` would read (a run directory's ``last``) and its
    ``config.json``, checked, without reading the weights."""
    path = Path(path)
    if (last := run_last(path)) is not None:
        if not last.exists():
            others = sorted(str(p) for p in path.glob("ckpt-*") if (p / CONFIG).exists())
            other = (f"(e.g. {str(path / 'best')!r})" if (path / "best").exists() else
                     f"({', '.join(repr(o) for o in others[-2:])})" if others else
                     "if there is one: this folder holds none; start a new run")
            raise ModelFolderError(f"{str(last)!r} points at {os.readlink(last)}, which is missing; "
                                   f"give another checkpoint of the run {other}")
        path = last
    if not path.exists():
        raise ModelFolderError(f"{str(path)!r} does not exist; give a save_pretrained folder, a checkpoint "
                               f"directory (e.g. RUN_DIR/last or RUN_DIR/best) or a run directory")
    if path.is_file():
        if exported := exported_model(path):
            raise ModelFolderError(f"{str(path)!r} is an exported model ({exported}); give the folder "
                                   f"it was exported from ({CONFIG} + {WEIGHTS})")
        raise ModelFolderError(f"{str(path)!r} is a file; give a folder ({CONFIG} + {WEIGHTS}). A weights file "
                               f"loads under its network's name: --model NAME --checkpoint FILE (coatnet eval, "
                               f"predict, export), --model NAME --pretrained FILE (coatnet train), "
                               f"create_model(NAME, pretrained=FILE) (Python)")
    if (path / LOCK).is_file() and not holds_a_run(path) and not (path / CONFIG).exists():
        raise ModelFolderError(f"{str(path)!r} holds no checkpoint yet: its run is in its first epoch, or stopped "
                               f"before its first save; give it once the run has saved one")
    if (architecture := timm_architecture(path)) is not None:  # timm's repository, downloaded: not a checkpoint
        weights = any((path / f).is_file() for f in TIMM_WEIGHTS)
        raise ModelFolderError(f"{str(path)!r} holds timm's {architecture} (its config.json is timm's), "
                               + (f"not a coatnet checkpoint: load it as pretrained weights (--pretrained {path}, "
                                  f"coatnet.from_pretrained)" if weights else
                                  f"without its weights ({' or '.join(TIMM_WEIGHTS)}): download them too "
                                  f"(hf download ORG/NAME --local-dir {path})"))
    if not (path / CONFIG).is_file() and not os.path.lexists(path / "last") and holds_a_run(path):
        # its `last` link removed (by hand): the run's other checkpoints are named, not "not a checkpoint"
        others = sorted(p.name for p in path.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / CONFIG).exists())
        other = str(path / "best") if (path / "best" / CONFIG).exists() else str(path / others[-1]) if others else None
        raise ModelFolderError(f"{str(path)!r} holds a run without its `last` link; "
                               + (f"give one of its checkpoints (e.g. {other!r})" if other else
                                  "it holds no complete checkpoint: start a new run"))
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelFolderError(f"{str(path)!r} is not a coatnet checkpoint or model folder (no {CONFIG} and "
                               f"{WEIGHTS}); give a folder written by `coatnet train` or save_pretrained")
    try:
        meta = json.loads((path / CONFIG).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "model" not in meta:
            raise ValueError("no model name and config")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{str(path / CONFIG)!r} is corrupt ({e}); use another checkpoint") from None
    return path, meta


def exported_model(path: Path) -> str | None:
    """What exported model the file ``path`` is, and what runs it (``coatnet export``'s formats), or None.
    TorchScript's archives end in .pt as weights files do: told by their compiled code inside."""
    exported = {".onnx": "ONNX, run by onnxruntime", ".pt2": "torch.export's, run by torch.export.load"}
    if path.suffix in exported:
        return exported[path.suffix]
    try:
        with zipfile.ZipFile(path) as archive:
            scripted = any(n.partition("/")[2].startswith("code/") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):  # not a zip: a weights file of another kind (safetensors), or none
        return None
    return "TorchScript, run by torch.jit.load" if scripted else None


def timm_architecture(path: Path) -> str | None:
    """The architecture timm's ``config.json`` in the folder ``path`` names (a Hub repository of timm's
    weights downloaded into it: ``hf download ORG/NAME --local-dir PATH``); None for any other folder,
    a ``save_pretrained`` one included, or a file."""
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # none, or unreadable: not a folder of timm's
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), str) or "config" in meta:
        return None
    return meta["architecture"]


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as e:  # truncated or not safetensors at all
        raise ModelFolderError(f"{str(file)!r} is corrupt or truncated ({type(e).__name__}); "
                               f"use another checkpoint (e.g. RUN_DIR/best)") from None


# --------------------------------------------------------------------------------------------
# Files written by earlier versions
# --------------------------------------------------------------------------------------------

# Version 1 of the config was one flat dict; each of its fields and where it lives now (a field
# that configured several parts goes to each).
_V1_FIELDS = {
    "stem_channels": [("stem", "channels")], "stem": [("stem", "kind")], "stem_stride": [("stem", "stride")],
    "stem_mid_channels": [("stem", "mid_channels")], "stem_bias": [("stem", "bias")],
    "activation": [("stem", "activation"), ("mbconv", "activation")],
    "expand_ratio": [("mbconv", "expand_ratio"), ("transformer", "expand_ratio")],
    "expand_from": [("mbconv", "expand_from"), ("transformer", "attention_width")],
    "pool": [("mbconv", "pool"), ("transformer", "pool")],
    "se_ratio": [("mbconv", "se_ratio")], "se_activation": [("mbconv", "se_activation")],
    "se_before_norm": [("mbconv", "se_before_norm")], "mbconv_pre_norm_act": [("mbconv", "pre_norm_activation")],
    "mbconv_output_bias": [("mbconv", "output_bias")],
    "head_size": [("transformer", "head_size")], "relative_position": [("transformer", "relative_position")],
    "relative_position_mlp_width": [("transformer", "relative_position_mlp_width")],
    "transformer_shortcut_bias": [("transformer", "shortcut_bias")],
    "layer_scale_init": [("transformer", "layer_scale_init")],
    "transformer_norm": [("transformer", "norm"), ("head", "norm")],
    "norm_eps": [("transformer", "norm_eps"), ("head", "norm_eps")],
    "head_hidden_size": [("head", "hidden_size")], "head_norm_before_pool": [("head", "norm_before_pool")],
}


def config_from_version_1(flat: dict) -> dict:
    """A version-1 config dict in version 2's form, nested by part of the network."""
    out = {"stem": {}, "mbconv": {}, "transformer": {}, "head": {}}
    for key, value in flat.items():
        if key in ("downsample_on_depthwise", "downsample_by_pool"):
            continue  # two booleans for one three-way choice, below
        for part, name in _V1_FIELDS.get(key, ()):
            out[part][name] = value
        if key not in _V1_FIELDS:
            out[key] = value  # name, stages, and the fields of the whole network
    depthwise, pool = flat.get("downsample_on_depthwise", False), flat.get("downsample_by_pool", False)
    out["mbconv"]["stride_on"] = "depthwise" if depthwise else "pool" if pool else "expand"
    return out


# Weights renamed since version 1: the relative-position bias became a module of its own.
_RENAMED_KEYS = ((re.compile(r"\.relative_position_table$"), ".relative_position.table"),
                 (re.compile(r"\.relative_position_mlp\."), ".relative_position."))


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved by an earlier version, under today's names."""
    for pattern, new in _RENAMED_KEYS:
        state = {pattern.sub(new, k): v for k, v in state.items()}
    return state
