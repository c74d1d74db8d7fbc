"""timm's CoAtNet weights in our names: ``coatnet convert-timm SRC --model NAME --output DIR``.

timm publishes ImageNet weights only for its own "rw" variants; ``coatnet_*_rw`` in
:mod:`coatnet.models.coatnet` reproduce them with our blocks (timm's ``coatnet_0_rw_224`` is our
``coatnet_0_rw``). The conversion renames keys and changes layouts only: timm keeps Transformer
blocks in NCHW, so their linear maps are 1x1 convs; interleaves q, k and v per head where we
keep them in three blocks; and stores a relative-position table as (offsets, heads) where we
store (heads, 2H-1, 2W-1). Nothing is downloaded: the user passes the file.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, imagenet_class_names
from .registry import list_models, model_entry

# timm's dim_head for every CoAtNet; our rw configurations keep the same head size.
TIMM_HEAD_SIZE = 32

_STEM = {"conv1": "0.0", "norm1": "0.1", "conv2": "1"}
_MBCONV = {"shortcut.expand": "shortcut.1", "pre_norm": "residual.norm", "conv1_1x1": "residual.expand.0",
           "norm1": "residual.expand.1", "se": "residual.se", "se_early": "residual.se",
           "conv3_1x1": "residual.project"}
# With SE before the depthwise BatchNorm (timm's "se_early") our depthwise conv and its norm are apart.
_DEPTHWISE = {False: {"conv2_kxk": "residual.depthwise.0", "norm2": "residual.depthwise.1"},
              True: {"conv2_kxk": "residual.depthwise", "norm2": "residual.depthwise_norm.0"}}
_TRANSFORMER = {"shortcut.expand": "shortcut", "norm1.norm": "attn_norm", "norm1": "attn_norm",
                "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "attn.rel_pos.mlp": "attn.relative_position",
                "ls1": "attn_scale", "ls2": "ffn_scale", "norm2": "ffn_norm", "mlp.fc1": "ffn.0", "mlp.fc2": "ffn.2"}
_HEAD = {"norm": "head_norm", "head.fc": "classifier"}
_TIMM_TABLE = "attn.rel_pos.relative_position_bias_table"


def timm_variants() -> list[str]:
    """Our names of timm's CoAtNet variants; timm's name adds the resolution, e.g. ``coatnet_0_rw_224``."""
    return list_models("coatnet_*_rw*")


def is_timm_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Whether the keys are timm's MaxxVit names (its CoAtNet class) rather than ours."""
    return "stem.conv1.weight" in state_dict


def _rename(module: str, param: str, table: dict[str, str]) -> str | None:
    """Our key for timm's ``module.param``, by the longest timm module prefix in ``table``."""
    for prefix in sorted(table, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return ".".join(filter(None, (table[prefix], module[len(prefix) + 1:], param)))
    return None


def _square_side(num_offsets: int, key: str) -> int:
    """The side 2G-1 of the table of a G x G grid's offsets."""
    side = math.isqrt(num_offsets)
    if side * side != num_offsets:
        raise ValueError(f"{key} has {num_offsets} offsets, not a square table; only square inputs are supported")
    if side % 2 == 0:
        raise ValueError(f"{key} has {num_offsets} offsets, a side of {side}: no grid gives that (a G x G grid has "
                         f"(2G-1)^2); check the file")
    return side


def _qkv_to_ours(weight: Tensor) -> Tensor:
    """timm orders the rows of qkv head by head, (q, k, v) inside each; ours are q, k, v, each head by head."""
    heads = weight.shape[0] // (3 * TIMM_HEAD_SIZE)
    return weight.reshape(heads, 3, TIMM_HEAD_SIZE, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def _convert(key: str, value: Tensor, state_dict: dict[str, Tensor]) -> tuple[str, Tensor]:
    module, _, param = key.rpartition(".")
    if key.startswith("stem."):
        ours = _rename(module[len("stem."):], param, _STEM)
        return (f"stem.{ours}" if ours else key), value
    block = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", module)
    if block is None:
        return _rename(module, param, _HEAD) or key, value
    stage, index, inner = block.groups()
    timm_prefix = f"stages.{stage}.blocks.{index}."
    if f"stages.{stage}.blocks.0.attn.qkv.weight" not in state_dict:  # an MBConv stage
        early_se = f"{timm_prefix}se_early.fc1.weight" in state_dict
        ours = _rename(inner, param, _MBCONV | _DEPTHWISE[early_se])
        return (f"stages.{stage}.{index}.{ours}" if ours else key), value
    if key.endswith(_TIMM_TABLE):  # (offsets, heads) -> (heads, 2H-1, 2W-1), square grids only
        if value.dim() != 2:
            raise ValueError(f"{key} has shape {tuple(value.shape)}; timm's tables are (offsets, heads): check the file")
        side = _square_side(value.shape[0], key)
        return f"stages.{stage}.blocks.{index}.attn.relative_position.table", value.t().reshape(-1, side, side)
    ours = _rename(inner, param, _TRANSFORMER)
    if ours is None:
        return key, value
    if inner == "attn.qkv":
        value = _qkv_to_ours(value)
    if value.dim() == 4:  # a 1x1 conv on NCHW is our linear map on tokens
        value = value.flatten(1)
    return f"stages.{stage}.blocks.{index}.{ours}", value


def convert_timm_state_dict(state_dict: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """timm's state dict of a CoAtNet variant, in the names and layouts of our ``model_name``.

    Keys that are not timm's are kept as they are, so that loading names them as unexpected.
    ``model_name`` is ours (``coatnet_0_rw``) or timm's, as create_model takes it (``coatnet_0_rw_224``,
    ``coatnet_0_rw_224.sw_in1k``).
    """
    try:
        resolved = model_entry(model_name).name
    except ValueError:  # not a name of ours: said below
        resolved = model_name
    if resolved not in timm_variants():
        ours = re.sub(r"_\d+$", "", model_name)  # timm's name ends in the resolution
        hint = (f"timm's {model_name} is our {ours}" if ours in timm_variants()
                else f"timm weights fit: {', '.join(timm_variants())}")
        raise ValueError(f"{model_name!r} is not one of timm's CoAtNet variants; {hint}")
    return dict(_convert(k, v, state_dict) for k, v in state_dict.items())


def timm_img_size(state_dict: dict[str, Tensor]) -> int | None:
    """The input size timm's relative-position tables were built for; None without tables (rmlp)."""
    tables = sorted(k for k in state_dict if k.startswith("stages.3.") and k.endswith(_TIMM_TABLE))
    if not tables:
        return None
    side = _square_side(state_dict[tables[0]].shape[0], tables[0])  # 2G-1 for S4's G x G grid
    return (side + 1) // 2 * 32  # the rw variants' stride is 32


def classifier_size(state: dict[str, torch.Tensor]) -> int:
    """The number of classes of weights, ours or timm's; 0 without a classifier."""
    head = state.get("classifier.weight", state.get("head.fc.weight"))
    return head.shape[0] if head is not None else 0


def timm_variant_of(state_dict: dict[str, Tensor]) -> str | None:
    """Our name of the rw variant whose network these timm weights fit exactly (built on the meta
    device, at the resolution of the weights' tables and with their classifier), or None."""
    options = dict(img_size=timm_img_size(state_dict), num_classes=classifier_size(state_dict))
    for name in timm_variants():
        with torch.device("meta"):
            own = model_entry(name).builder(**options).state_dict()
        ours = convert_timm_state_dict(state_dict, name)
        if ours.keys() == own.keys() and all(ours[k].shape == own[k].shape for k in own):
            return name
    return None


# timm's preprocessing of its CoAtNet weights (maxxvit.py's default_cfgs): mean and std 0.5,
# bicubic, crop 0.95, with a few variants' own crops; its 384 px fine-tunes resize without a crop.
_TIMM_PREPROCESSING = PretrainedCfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.95)
_TIMM_OWN_PREPROCESSING = {"coatnet_nano_rw": dict(crop_pct=0.9), "coatnet_rmlp_nano_rw": dict(crop_pct=0.9),
                           "coatnet_bn_0_rw": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)}


def timm_pretrained_cfg(model_name: str, img_size: int | None, num_classes: int,
                        hub_config: dict | None = None, source: str | None = None) -> PretrainedCfg:
    """How timm prepares images for its weights of our ``model_name`` at ``img_size``: the
    ``pretrained_cfg`` (and ``label_names``) of the repository's ``hub_config`` when there is one,
    over timm's defaults for the variant. A 1000-class head is ImageNet-1k's. ``num_classes`` is the
    head of the weights the config describes; ``source``, naming that config.json, asks for a warning
    where its class names do not fit that head."""
    values = _TIMM_OWN_PREPROCESSING.get(model_name, {})
    if img_size is not None and img_size >= 384:
        values = values | dict(crop_pct=1.0, crop_mode="squash")
    cfg = replace(_TIMM_PREPROCESSING, **values)
    if hub_config:
        own = dict(hub_config.get("pretrained_cfg") or {})
        if hub_config.get("label_names") is not None:  # timm's top-level names win over its pretrained_cfg's
            own["label_names"] = hub_config["label_names"]
        cfg = PretrainedCfg.from_dict(cfg.to_dict() | {k: v for k, v in own.items() if v is not None})
    if source and cfg.label_names is not None and len(cfg.label_names) != num_classes:
        # Said, not refused: timm writes such a list itself (push_to_hf_hub after reset_classifier keeps the old
        # head's names) and loads the repository, whose weights are sound. The names cannot say which output is
        # which, so none is used (outputs are numbered), not ImageNet's either. Our own folders, whose names are
        # training's record of its classes, are refused instead (folder.read_pretrained_cfg).
        warnings.warn(f"{source} lists {len(cfg.label_names)} class names but the weights it describes have "
                      f"{num_classes} outputs; the names are left out and the outputs numbered", stacklevel=2)
        return replace(cfg, label_names=None)
    names = cfg.label_names or (imagenet_class_names() if num_classes == 1000 else None)
    return cfg.with_classes(num_classes, names)
