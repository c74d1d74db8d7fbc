"""CoAtNet: depthwise convolution and relative self-attention, stacked C-C-T-T.

Dai, Liu, Le, Tan. "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021
(arXiv:2106.04803). Equation, table and appendix numbers in the comments are the paper's.

The file reads top to bottom as the paper: the configuration (one frozen dataclass per part of the
network, the paper's values as defaults), the blocks (S0 stem, MBConv with Eq. 5, relative
attention with Eq. 3, the Transformer block with Eq. 4), the network, then the named
configurations: CoAtNet-0..7 (Tables 3, 11, 12), the five layouts of the controlled study
(Section 2.2), two small models of ours for CPU work on small images, and timm's "rw" variants, for
the ImageNet weights timm publishes. What makes eager inference fast is in ``fast_path.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
from collections import OrderedDict
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from ..validate import Fraction, PositiveFloat, Range, check_fields
from .fast_path import (ACTIVATIONS, ConvBNAct, FeedForward, SqueezeExcite, attention, channels_last, exactly,
                        fusable, mbconv_inference)
from .folder import config_from_version_1, save_pretrained
from .preprocessing import PretrainedCfg
from .registry import PaperFigures, register_alias, register_model

__all__ = ["StemConfig", "MBConvConfig", "TransformerConfig", "HeadConfig", "StageConfig", "CoAtNetConfig",
           "CoAtNet", "FeatureExtractor", "MBConv", "RelativeAttention", "RelativePositionTable", "RelativePositionMLP",
           "TransformerBlock"]

# Sizes are bounded far above any CoAtNet's (CoAtNet-7: 3072 wide, 42 blocks in a stage) so that a
# mistyped config.json fails in one line instead of asking for terabytes.
Width = Annotated[int, Range(1, 16384)]
Depth = Annotated[int, Range(1, 1024)]
Ratio = Annotated[int, Range(1, 64)]
MAX_IMG_SIZE = 4096  # the largest input side, here and at every command's --img-size
Activation = Literal["gelu", "silu", "relu"]
Pool = Literal["max", "avg", "max3x3"]  # the Pool of Eq. 4, 5, stride 2: 2x2 max (the paper), 2x2 avg, 3x3 max
Norm = Literal["layernorm", "batchnorm"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
# The defaults are the paper's. The fields marked [rw] exist for timm's "rw" variants (the
# coatnet_*_rw configurations at the end of this file), whose ImageNet weights timm publishes.


class _Checked:
    """Each config checks its fields against their annotations when built (``coatnet.validate``)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class StemConfig(_Checked):
    """S0: two 3x3 convs, the first strided (Section 2.2), or VIT_REL's patch embedding."""

    channels: Width
    kind: Literal["conv", "patch"] = "conv"
    stride: Annotated[int, Range(1, 64)] = 2  # conv: the first conv's stride; patch: the patch size
    mid_channels: Width | None = None  # [rw] width of the first conv (default: channels)
    bias: bool = True  # [rw] bias on the second conv
    activation: Activation = "gelu"  # [rw]


@dataclass(frozen=True)
class MBConvConfig(_Checked):
    """MBConv blocks (Section 2.1, Eq. 5): inverted bottleneck x4, depthwise 3x3, squeeze-excitation."""

    expand_ratio: Ratio = 4
    se_ratio: Annotated[float, Range(0, 1, low_open=True)] = 0.25  # SE squeeze width relative to the output width
    # Where a down-sampling block strides: "expand", the first 1x1 conv (Eq. 5); "depthwise", the
    # depthwise conv (Table 9); "pool", a 2x2 average pool before the expansion [rw].
    stride_on: Literal["expand", "depthwise", "pool"] = "expand"
    pool: Pool = "max"  # on the shortcut
    activation: Activation = "gelu"  # [rw]
    # [rw] "input": the hidden width is expand_ratio x the block's input width, and SE squeezes
    # se_ratio x the hidden width.
    expand_from: Literal["output", "input"] = "output"
    pre_norm_activation: bool = False  # [rw] an activation after the pre-norm BatchNorm
    se_activation: Activation = "gelu"  # [rw]
    se_before_norm: bool = False  # [rw] SE on the depthwise conv's output, before its BatchNorm
    output_bias: bool = True  # [rw] bias on the projection and shortcut 1x1 convs


@dataclass(frozen=True)
class TransformerConfig(_Checked):
    """Transformer blocks with relative attention (Section 2.1, Eq. 3, Eq. 4) and their FFN."""

    head_size: Annotated[int, Range(1, 1024)] = 32  # Table 3
    expand_ratio: Ratio = 4  # of the FFN
    # "table": Eq. 3's w, a learnt (2H-1)x(2W-1) table per head; "mlp": computed from the offset
    # by a small MLP [rw: the rmlp variants].
    relative_position: Literal["table", "mlp"] = "table"
    relative_position_mlp_width: Width = 512
    pool: Pool = "max"
    attention_width: Literal["output", "input"] = "output"  # [rw] width of q, k and v
    shortcut_bias: bool = True  # [rw] bias on the Proj of Eq. 4
    layer_scale_init: PositiveFloat | None = None  # [rw] a learnt per-channel scale on both branches
    norm: Norm = "layernorm"  # [rw]
    norm_eps: PositiveFloat = 1e-5  # [rw]


@dataclass(frozen=True)
class HeadConfig(_Checked):
    """Global average pooling, a norm, an optional pre-logits layer, the classifier."""

    hidden_size: Width | None = None  # pre-logits Linear + tanh
    norm: Norm = "layernorm"  # [rw]
    norm_eps: PositiveFloat = 1e-5  # [rw]
    norm_before_pool: bool = False  # [rw] normalise the last feature map, then pool


@dataclass(frozen=True)
class StageConfig(_Checked):
    """One stage: ``depth`` blocks of one type, ``channels`` wide.

    The first block changes the width and, when ``stride`` is 2, halves the resolution on both of
    its branches (Appendix A.1). CoAtNet-6/7 split S3 in two: MBConv blocks, then Transformer
    blocks at a larger width with ``stride=1``.
    """

    block: Literal["mbconv", "transformer"]
    depth: Depth
    channels: Width
    stride: Literal[1, 2] = 2


_PARTS = {"stem": StemConfig, "mbconv": MBConvConfig, "transformer": TransformerConfig, "head": HeadConfig}


@dataclass(frozen=True)
class CoAtNetConfig(_Checked):
    """Everything that defines a network; ``CoAtNet(config)`` builds it.

    ``img_size`` sizes the relative-position tables (one (2H-1)x(2W-1) table per head and layer,
    for the H x W grid the stage sees at that input size); other input sizes still work, with the
    tables interpolated (Section 2.1). ``to_dict``/``from_dict`` are its ``config.json`` form.
    """

    VERSION: ClassVar[int] = 2  # of the dict form; 1 was one flat dict of 31 fields

    name: str
    stem: StemConfig
    stages: tuple[StageConfig, ...]
    mbconv: MBConvConfig = field(default_factory=MBConvConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    drop_path_rate: Fraction = 0.0  # stochastic depth, linear in block index (Table 10 rates)
    num_classes: Annotated[int, Range(0, 1_000_000)] = 1000  # 0: no classifier
    in_chans: Annotated[int, Range(1, 1024)] = 3
    img_size: tuple[int, int] = (224, 224)

    def __post_init__(self) -> None:
        super().__post_init__()
        img = tuple(self.img_size) if isinstance(self.img_size, (tuple, list)) else (self.img_size, self.img_size)
        object.__setattr__(self, "img_size", img)
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages or not all(isinstance(s, StageConfig) for s in self.stages):
            raise ValueError("stages must be one or more StageConfig")
        widths_in = [self.stem.channels] + [s.channels for s in self.stages]
        for s, width_in in zip(self.stages, widths_in):
            if s.block != "transformer":
                continue
            # Each block attends at its output width, or [rw] at its input width (the first's is the last stage's).
            for width in (s.channels, width_in) if self.transformer.attention_width == "input" else (s.channels,):
                if width % self.transformer.head_size:
                    raise ValueError(f"transformer width {width} is not a multiple of head size "
                                     f"{self.transformer.head_size}")
        if len(img) != 2 or any(not isinstance(side, int) or side > MAX_IMG_SIZE for side in img):
            raise ValueError(f"img_size must be one or two integers up to {MAX_IMG_SIZE}, got {self.img_size!r}")
        if any(side <= 0 or side % self.stride for side in img):
            near = [max(self.stride, math.ceil(side / self.stride) * self.stride) for side in img]
            raise ValueError(f"img_size {img[0]}x{img[1]} is not a multiple of the model's stride {self.stride}; "
                             f"use e.g. {near[0]}x{near[1]}")

    @property
    def stride(self) -> int:
        """Total down-sampling from input to the last feature map (32 for the paper's models)."""
        return self.stem.stride * math.prod([s.stride for s in self.stages])  # a list: the compiler traces no generator

    @property
    def num_features(self) -> int:
        return self.stages[-1].channels

    @property
    def layout(self) -> str:
        """The paper's name for the vertical layout, e.g. 'C-C-T-T' or 'VIT_REL'."""
        if self.stem.kind == "patch":
            return "VIT_REL"
        return "-".join("C" if s.block == "mbconv" else "T" for s in self.stages)

    def to_dict(self) -> dict:
        """The JSON form: nested dicts, plus the format's ``version``."""
        out = {"version": self.VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = {k.name: getattr(value, k.name) for k in fields(value)} if f.name in _PARTS else value
        out["stages"] = [{k.name: getattr(s, k.name) for k in fields(s)} for s in self.stages]
        out["img_size"] = list(self.img_size)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CoAtNetConfig:
        """The config of a ``to_dict`` dict, this version's or version 1's (written before nested configs)."""
        data = dict(data)
        version = data.pop("version", 1)
        if version == 1:
            data = config_from_version_1(data)
        elif version != cls.VERSION:
            raise ValueError(f"config version {version} is newer than this coatnet reads ({cls.VERSION}); "
                             f"upgrade coatnet")
        parts = {name: _build_part(kind, data[name], name) for name, kind in _PARTS.items() if name in data}
        stages = [_build_part(StageConfig, s, "stages") for s in data.get("stages", ())]
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; "
                             f"fields: {', '.join(f.name for f in fields(cls))}")
        return cls(**(data | parts | {"stages": stages}))

    def __str__(self) -> str:
        t = self.transformer
        rows = [f"{self.name}: {self.layout}, input {self.in_chans}x{self.img_size[0]}x{self.img_size[1]}, "
                f"{self.num_classes} classes, head size {t.head_size}, drop path {self.drop_path_rate}"]
        stem = "patch" if self.stem.kind == "patch" else "conv stem"
        rows.append(f"  S0  {stem:<11} x{1 if self.stem.kind == 'patch' else 2:<2} {self.stem.channels:>5} ch  "
                    f"stride {self.stem.stride}")
        for i, s in enumerate(self.stages, 1):
            rows.append(f"  S{i}  {s.block:<11} x{s.depth:<2} {s.channels:>5} ch  stride {s.stride}")
        pre_logits = f"pre-logits {self.head.hidden_size} + " if self.head.hidden_size else ""
        norm = "LayerNorm" if self.head.norm == "layernorm" else "BatchNorm"
        pool_norm = f"{norm} + avg-pool" if self.head.norm_before_pool else f"avg-pool + {norm}"
        rows.append(f"  head  {pool_norm} + {pre_logits}linear {self.num_classes}")
        return "\n".join(rows)


def _build_part(kind: type, value, name: str):
    """A nested config from its dict (or itself); unknown keys are named in one line."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a {kind.__name__} or a dict of its fields, got {value!r}")
    known = [f.name for f in fields(kind)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {', '.join(unknown)}; options: {', '.join(known)}")
    missing = [f.name for f in fields(kind) if MISSING is f.default is f.default_factory and f.name not in value]
    if missing:
        raise ValueError(f"{name} option(s) {', '.join(missing)} missing from {value!r}; options: {', '.join(known)}")
    return kind(**value)


# --------------------------------------------------------------------------------------------
# S0 and MBConv (Section 2.1, Eq. 5)
# --------------------------------------------------------------------------------------------


def conv_stem(in_chans: int, config: StemConfig) -> nn.Sequential:
    """S0: a 2-layer convolutional stem, 3x3 with ``stride`` then 3x3 (Section 2.2).

    Its output enters the residual stream un-normalized: every block after it is pre-norm.
    """
    mid_channels = config.mid_channels or config.channels
    return nn.Sequential(
        ConvBNAct(in_chans, mid_channels, 3, stride=config.stride, activation=config.activation),
        nn.Conv2d(mid_channels, config.channels, 3, padding=1, bias=config.bias),
    )


def pool_2d(pool: str) -> nn.Module:
    """The Pool of Eq. 4 and 5 on an NCHW map, stride 2."""
    if pool == "max3x3":
        return nn.MaxPool2d(3, 2, padding=1)
    return nn.MaxPool2d(2, 2) if pool == "max" else nn.AvgPool2d(2, 2)


def shortcut_2d(in_channels: int, out_channels: int, stride: int, pool: str = "max", bias: bool = True) -> nn.Module:
    """The identity branch: Proj(Pool(x)) when the block down-samples or changes width (A.1)."""
    layers = []
    if stride > 1:
        layers.append(pool_2d(pool))
    if in_channels != out_channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 1, bias=bias))
    return nn.Sequential(*layers) if layers else nn.Identity()


class MBConv(nn.Module):
    """Pre-activation MBConv with squeeze-excitation: ``x + Module(BatchNorm(x))``.

    Module = 1x1 conv (expand x4) -> depthwise 3x3 -> SE (0.25) -> 1x1 conv, BatchNorm and GELU
    between. The expansion is taken from the output width, as in the inverted bottleneck of the FFN.
    With ``stride=2`` (Eq. 5): ``x <- Proj(Pool(x)) + Conv(DepthConv(Conv(Norm(x), stride=2)))``,
    the stride on the first 1x1 conv, or where ``config.stride_on`` puts it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 config: MBConvConfig = MBConvConfig(), drop_path: float = 0.0):
        super().__init__()
        c = config
        from_input = c.expand_from == "input"
        hidden = (in_channels if from_input else out_channels) * c.expand_ratio
        squeeze = max(1, int((hidden if from_input else out_channels) * c.se_ratio))
        self.shortcut = shortcut_2d(in_channels, out_channels, stride, c.pool, c.output_bias)
        expand_stride = stride if c.stride_on == "expand" else 1
        depthwise_stride = stride if c.stride_on == "depthwise" else 1
        layers = [("norm", nn.BatchNorm2d(in_channels))]
        if c.pre_norm_activation:
            layers.append(("act", ACTIVATIONS[c.activation]()))
        if stride > 1 and c.stride_on == "pool":  # timm averages here, whichever pool its shortcut uses
            layers.append(("pool", nn.AvgPool2d(stride)))
        layers.append(("expand", ConvBNAct(in_channels, hidden, 1, stride=expand_stride, activation=c.activation)))
        se = SqueezeExcite(hidden, squeeze, activation=ACTIVATIONS[c.se_activation])
        if c.se_before_norm:
            depthwise = nn.Conv2d(hidden, hidden, 3, depthwise_stride, padding=1, groups=hidden, bias=False)
            layers += [("depthwise", depthwise), ("se", se),
                       ("depthwise_norm", nn.Sequential(nn.BatchNorm2d(hidden), ACTIVATIONS[c.activation]()))]
        else:
            layers += [("depthwise", ConvBNAct(hidden, hidden, 3, depthwise_stride, hidden, c.activation)),
                       ("se", se)]
        layers.append(("project", nn.Conv2d(hidden, out_channels, 1, bias=c.output_bias)))
        self.residual = nn.Sequential(OrderedDict(layers))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.drop_path(self.residual(x))


# --------------------------------------------------------------------------------------------
# Relative attention (Section 2.1, Eq. 3) and the Transformer block (Eq. 4)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def relative_position_index(height: int, width: int, device: torch.device) -> Tensor:
    """(N, N) index into a flattened (2H-1)x(2W-1) table: entry (p, p') is the offset p - p'.

    Derived from the grid alone, never from weights, so it can be kept for every call.
    """
    with torch.inference_mode(False):  # kept across calls, so never an inference-mode tensor
        rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                    indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        dr = rows[:, None] - rows[None, :] + height - 1
        dc = cols[:, None] - cols[None, :] + width - 1
        return dr * (2 * width - 1) + dc


def gather_relative_bias(table: Tensor, height: int, width: int) -> Tensor:
    """(heads, H*W, H*W) bias from a (heads, 2H-1, 2W-1) table: entry (i, j) is w_{i-j}."""
    # The compiler folds the index into the graph; it would trace through the lru_cache, and warn.
    index = relative_position_index.__wrapped__ if torch.compiler.is_compiling() else relative_position_index
    n = height * width
    # index_select rather than advanced indexing: the same gather, 2.5x faster, its gradient 3.5x (CPU)
    return table.flatten(1).index_select(1, index(height, width, table.device).flatten()).view(-1, n, n)


def resize_relative_table(table: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly interpolate (heads, 2H-1, 2W-1) tables to (heads, *size) (Section 2.1).

    ``align_corners=True`` keeps offset 0 at the centre and the largest offsets at the edges. A side
    of 1 (a grid one token high or wide: offset 0 alone) is the centre row or column, which
    interpolation would not give (it samples the first, the largest negative offset).
    """
    for dim, side in ((-2, size[0]), (-1, size[1])):
        if side == 1:
            table = table.narrow(dim, (table.shape[dim] - 1) // 2, 1)
    if tuple(table.shape[-2:]) == tuple(size):
        return table
    return F.interpolate(table.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=True)[0].to(table.dtype)


class RelativePositionTable(nn.Module):
    """Eq. 3's w_{i-j}: one learnt scalar per head and relative offset, in a (2H-1)x(2W-1) table.

    Sized for ``grid_size``; for another grid the table is bilinearly interpolated, and a state
    dict saved at another size is interpolated on load (Section 2.1, fine-tuning at 384 and 512).
    """

    def __init__(self, num_heads: int, grid_size: tuple[int, int]):
        super().__init__()
        height, width = grid_size
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * height - 1, 2 * width - 1))

    def forward(self, height: int, width: int) -> Tensor:
        """The (heads, H*W, H*W) bias for an H x W grid."""
        return gather_relative_bias(resize_relative_table(self.table, (2 * height - 1, 2 * width - 1)), height, width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "table")
        if saved is not None and saved.dim() == 3 and saved.shape[0] == self.table.shape[0]:
            state_dict[prefix + "table"] = resize_relative_table(saved, tuple(self.table.shape[1:]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RelativePositionMLP(nn.Module):
    """w_{i-j} computed, not stored (timm's rmlp variants, after Swin-V2): a 2-layer ReLU MLP maps each
    log-spaced offset sign(d) log(1 + |d|) to one scalar per head, so any grid gets its bias without
    interpolation. Dropout on the hidden layer, as timm trains it."""

    def __init__(self, num_heads: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.125)
        self.fc2 = nn.Linear(hidden, num_heads)

    def forward(self, height: int, width: int) -> Tensor:
        """The (heads, H*W, H*W) bias for an H x W grid."""
        device = self.fc1.weight.device
        dr = torch.arange(-(height - 1), height, device=device, dtype=torch.float32)
        dc = torch.arange(-(width - 1), width, device=device, dtype=torch.float32)
        offsets = torch.stack(torch.meshgrid(dr, dc, indexing="ij"), dim=-1)  # (2H-1, 2W-1, 2)
        offsets = (offsets.sign() * offsets.abs().log1p()).to(self.fc1.weight.dtype)
        table = self.fc2(self.drop(self.act(self.fc1(offsets))))
        return gather_relative_bias(table.permute(2, 0, 1), height, width)


class RelativeAttention(nn.Module):
    """Multi-head self-attention with a pre-softmax relative position bias (Eq. 3).

    ``y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w_{i-j}) v_j``: w is an input-independent scalar
    per relative offset and head, from ``self.relative_position``; not shared across layers.
    ``config.attention_width="input"`` [rw] attends at ``in_dim`` and widens in the output projection.
    """

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int],
                 config: TransformerConfig = TransformerConfig()):
        super().__init__()
        attention_dim = in_dim if config.attention_width == "input" else out_dim
        self.num_heads = attention_dim // config.head_size
        self.head_size = config.head_size
        self.qkv = nn.Linear(in_dim, 3 * attention_dim)
        self.proj = nn.Linear(attention_dim, out_dim)
        self.relative_position = (RelativePositionMLP(self.num_heads, config.relative_position_mlp_width)
                                  if config.relative_position == "mlp"
                                  else RelativePositionTable(self.num_heads, grid_size))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position(height, width).to(q.dtype)
        # A 4-D bias (1, heads, N, N): with a 3-D one the CPU falls back from its fused kernel to the math path.
        y = attention(q, k, v, bias.unsqueeze(0))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


def pool_tokens(x: Tensor, height: int, width: int, pool: str = "max") -> Tensor:
    """:func:`pool_2d`'s Pool, stride 2, on a (B, H*W, C) token sequence laid out row by row.

    The tokens are an NCHW map in channels-last memory, without a copy; its pooling kernel is ~10x
    faster than a max over a 6-D view of the tokens.
    """
    b, _, c = x.shape
    if pool == "avg":
        return x.reshape(b, height // 2, 2, width // 2, 2, c).mean(dim=(2, 4)).reshape(b, -1, c)
    grid = x.transpose(1, 2).reshape(b, c, height, width)
    pooled = F.max_pool2d(grid, 2) if pool == "max" else F.max_pool2d(grid, 3, 2, padding=1)
    return pooled.flatten(2).transpose(1, 2)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dimension of tokens (B, ..., C): timm's coatnet_bn_0_rw."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def token_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The Norm of a Transformer block or the head: LayerNorm (the paper) or BatchNorm."""
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else TokenBatchNorm(dim, eps=eps)


class LayerScale(nn.Module):
    """A learnt per-channel scale on a residual branch, started small (CaiT; timm's larger rw variants)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block with relative attention (TFM_Rel) on a (B, H*W, C) sequence.

    ``x <- x + Attention(LayerNorm(x))``, then ``x <- x + FFN(LayerNorm(x))`` with a x4 GELU FFN.
    With ``downsample`` (Eq. 4): ``x <- Proj(Pool(x)) + Attention(Pool(Norm(x)))``, Pool a 2x2
    max-pool with stride 2 and Proj a linear map to the new width.
    """

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], downsample: bool = False,
                 config: TransformerConfig = TransformerConfig(), drop_path: float = 0.0):
        super().__init__()
        c = config
        self.downsample = downsample
        self.pool = c.pool
        self.shortcut = nn.Linear(in_dim, out_dim, bias=c.shortcut_bias) if in_dim != out_dim else nn.Identity()
        self.attn_norm = token_norm(c.norm, in_dim, c.norm_eps)
        self.attn = RelativeAttention(in_dim, out_dim, grid_size, c)
        self.attn_scale = LayerScale(out_dim, c.layer_scale_init) if c.layer_scale_init else nn.Identity()
        self.ffn_norm = token_norm(c.norm, out_dim, c.norm_eps)
        self.ffn = FeedForward(out_dim, c.expand_ratio * out_dim)
        self.ffn_scale = LayerScale(out_dim, c.layer_scale_init) if c.layer_scale_init else nn.Identity()
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``height`` x ``width`` is the input grid; the output grid is half of it when down-sampling."""
        y = self.attn_norm(x)
        if self.downsample:
            x, y = pool_tokens(x, height, width, self.pool), pool_tokens(y, height, width, self.pool)
            height, width = height // 2, width // 2
        x = self.shortcut(x) + self.drop_path(self.attn_scale(self.attn(y, height, width)))
        return x + self.drop_path(self.ffn_scale(self.ffn(self.ffn_norm(x))))


# --------------------------------------------------------------------------------------------
# Stages and the network
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keeping_buffers(block: nn.Module):
    """Undo what a recomputation writes to ``block``'s buffers, so BatchNorm's running statistics
    move once per step, as without checkpointing."""
    saved = [(buffer, buffer.clone()) for buffer in block.buffers()]
    try:
        yield
    finally:  # also when the recomputation stops early, as non-reentrant checkpointing does by raising
        for buffer, value in saved:
            buffer.copy_(value)


def run_block(block: nn.Module, checkpointing: bool, *args) -> Tensor:
    """``block(*args)``; with ``checkpointing`` (and autograd on), its activations are recomputed in
    the backward pass instead of stored. Outputs, gradients and statistics are the same."""
    if not (checkpointing and torch.is_grad_enabled()):
        return block(*args)
    # The compiled graph writes the buffers once, recomputed or not. (A block Dynamo cannot trace in one
    # piece, for a forward hook calling .item() in it, runs eagerly without the restore: statistics move twice.)
    if torch.compiler.is_compiling():
        return checkpoint(block, *args, use_reentrant=False)
    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _keeping_buffers(block)))


class ConvStage(nn.Sequential):
    """A stage of MBConv blocks, NCHW in and out."""

    def __init__(self, blocks: list[MBConv]):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            plain = not exactly(block, MBConv) or not fusable(block)  # a user's block runs as it is
            x = run_block(block, self.grad_checkpointing, x) if plain else mbconv_inference(block, x)
        return x


class TransformerStage(nn.Module):
    """A stage of Transformer blocks: NCHW in and out, a token sequence inside.

    The network runs channels-last, so the NCHW map and the (B, H*W, C) sequence are the same
    memory: going in and out of the stage are views, not copies.
    """

    def __init__(self, blocks: list[TransformerBlock], stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stride = stride
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        for i, block in enumerate(self.blocks):
            x = run_block(block, self.grad_checkpointing, x, height, width)
            if i == 0:
                height, width = height // self.stride, width // self.stride
        return x.transpose(1, 2).reshape(b, -1, height, width)


SCRIPT_REFUSED = ("CoAtNet does not take torch.jit.script; trace or export it (torch.jit.trace, torch.export, "
                  "coatnet export)")


class CoAtNet(nn.Module):
    """CoAtNet and the layouts of the paper's controlled study, from a :class:`CoAtNetConfig`.

    S0 stem, stages S1..S4 (MBConv or Transformer), then global average pooling, LayerNorm, an
    optional pre-logits layer and a linear classifier (no class token). timm's interface:
    ``forward_features`` (NCHW map of the last stage), ``forward_head``, ``reset_classifier``,
    ``forward_intermediates`` and ``feature_info`` for dense-prediction users.
    """

    def __init__(self, config: CoAtNetConfig):
        super().__init__()
        self.config = config
        stem = config.stem
        if stem.kind == "patch":
            self.stem = nn.Conv2d(config.in_chans, stem.channels, stem.stride, stride=stem.stride)
        else:
            self.stem = conv_stem(config.in_chans, stem)

        total_blocks = sum(s.depth for s in config.stages)
        # Stochastic depth grows linearly with the block index, from 0 to drop_path_rate.
        rates = iter([config.drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)])
        grid = (config.img_size[0] // stem.stride, config.img_size[1] // stem.stride)
        channels, reduction = stem.channels, stem.stride
        self.feature_info = [dict(num_chs=channels, reduction=reduction, module="stem")]
        stages = []
        for i, s in enumerate(config.stages):
            grid = (grid[0] // s.stride, grid[1] // s.stride)
            blocks = []
            for j in range(s.depth):  # the first block changes width and resolution (A.1)
                block_in, stride = (channels, s.stride) if j == 0 else (s.channels, 1)
                if s.block == "mbconv":
                    blocks.append(MBConv(block_in, s.channels, stride, config.mbconv, next(rates)))
                else:
                    blocks.append(TransformerBlock(block_in, s.channels, grid, stride == 2, config.transformer,
                                                   next(rates)))
            stages.append(ConvStage(blocks) if s.block == "mbconv" else TransformerStage(blocks, s.stride))
            channels, reduction = s.channels, reduction * s.stride
            self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)

        head = config.head
        self.num_features = config.num_features
        self.head_hidden_size = head.hidden_size or config.num_features
        self.head_norm = token_norm(head.norm, self.num_features, head.norm_eps)
        self.pre_logits = (nn.Sequential(nn.Linear(self.num_features, head.hidden_size), nn.Tanh())
                           if head.hidden_size else nn.Identity())
        self.num_classes = config.num_classes
        self.classifier = nn.Linear(self.head_hidden_size, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(_init_weights)
        # How images are prepared for the weights (timm's name); loading weights replaces it with theirs.
        self.pretrained_cfg = PretrainedCfg.for_size(min(config.img_size))

    @property
    def pretrained_cfg(self) -> PretrainedCfg:
        """How images are prepared for the weights, at this model's input size (timm's ``input_size``)."""
        return replace(self._pretrained_cfg, input_size=(self.config.in_chans, *self.config.img_size))

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: PretrainedCfg | dict) -> None:
        if is_dataclass(cfg) and not isinstance(cfg, (type, PretrainedCfg)):  # timm's PretrainedCfg, as
            cfg = {f.name: getattr(cfg, f.name) for f in fields(cfg)}  # create_model(pretrained_cfg=) takes it
        if isinstance(cfg, dict):  # timm's form, a dict (its other keys, input_size among them, ignored)
            cfg = PretrainedCfg.from_dict(cfg)
        if not isinstance(cfg, PretrainedCfg):
            raise ValueError(f"pretrained_cfg is a PretrainedCfg or a dict of its fields (mean, std, interpolation, "
                             f"crop_pct, crop_mode, label_names), got {type(cfg).__name__}")
        self._pretrained_cfg = cfg

    # -- timm-style interface ----------------------------------------------------------------

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError, saying what was expected, for a batch this model cannot take."""
        c = self.config
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected a 4-D batch (N, C, H, W), got {shape}; add a batch dimension with x[None]")
        if x.shape[0] == 0 and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            raise ValueError(f"the batch is empty (input shape {tuple(x.shape)}); give at least one image")
        if x.shape[1] != c.in_chans:
            raise ValueError(f"expected {c.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                             f"build the model with in_chans={x.shape[1]} or convert the images")
        if not x.is_floating_point():
            raise ValueError(f"the batch is {x.dtype}, not floating point; scale and normalise the images, as "
                             f"coatnet.data_transforms(model) does")
        weight = next(self.stem.parameters())  # the first conv's (FSDP's gathered one in its forward)
        # (On the meta device only the shape is checked: sizes are checked so, before any tensor exists.)
        if x.dtype != weight.dtype and x.device.type != "meta" and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"the batch is {x.dtype} and the model {weight.dtype}; convert one to the other, "
                             f"e.g. x.to({weight.dtype}), or run under torch.autocast")
        height, width = x.shape[-2:]
        if height == 0 or width == 0:
            raise ValueError(f"the images are empty (input shape {tuple(x.shape)}); give images of at least "
                             f"{c.stride}x{c.stride}")
        if height % c.stride or width % c.stride:
            near = [max(c.stride, math.ceil(side / c.stride) * c.stride) for side in (height, width)]
            raise ValueError(f"input size {height}x{width} is not a multiple of the model's stride {c.stride}; "
                             f"resize or crop to e.g. {near[0]}x{near[1]}")

    def forward_stem(self, x: Tensor) -> Tensor:
        """Check the batch and run S0, channels-last from here on: NCHW shape, NHWC memory.

        On CPU the convolutions are several times faster so, and the Transformer stages read the
        maps as token sequences without a copy. The values are the same; the maps returned by
        ``forward_features`` and ``forward_intermediates`` keep that memory format.
        """
        self.check_input(x)
        return self.stem(channels_last(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map (B, C, H, W), normalised where the head norms before pooling ([rw], as
        timm's ``forward_features`` gives it)."""
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._norm_map(x)

    def _norm_map(self, x: Tensor) -> Tensor:
        if not self.config.head.norm_before_pool:
            return x
        return self.head_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last: views, no copy

    global_pool = "avg"  # timm's name; '' (reset_classifier(0, '')): the head gives the map itself

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if not self.global_pool:  # dense features, as timm's unpooled head gives them
            return x
        x = x.mean(dim=(2, 3))
        if not self.config.head.norm_before_pool:  # else the features are normalised already
            x = self.head_norm(x)
        x = self.pre_logits(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier). The head's
        pooling is the average (timm's ``global_pool="avg"``, the paper's), or, as in timm, none
        (``reset_classifier(0, "")``): the model then gives the last stage's map, as ``forward_features``
        does; ``None`` keeps the pooling as it is."""
        pool = self.global_pool if global_pool is None else global_pool
        if pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r}: CoAtNet's head pools by the average ('avg') or not at "
                             f"all ('')")
        if not pool and num_classes:
            raise ValueError(f"global_pool '': the map is given unpooled, without a classifier; pass num_classes=0, "
                             f"or global_pool='avg' for {num_classes} classes")
        like = next(self.stem.parameters())  # the new head lives where the model does, in its dtype
        num_classes = plain_int(num_classes)  # a numpy int too, as the config holds it
        self.config = replace(self.config, num_classes=num_classes)  # checked first: refused, nothing changes
        self.num_classes, self.global_pool = num_classes, pool
        self.classifier = (nn.Linear(self.head_hidden_size, num_classes, device=like.device, dtype=like.dtype)
                           if num_classes else nn.Identity())
        self.classifier.apply(_init_weights)
        # A fresh head's classes are not the old one's, even as many of them: their names go
        self.pretrained_cfg = replace(self.pretrained_cfg, label_names=None)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refused in one line, as README says, not with TorchScript's
        # RuntimeError about a line deep in the fast path (which scripting cannot compile)
        raise TypeError(SCRIPT_REFUSED)

    @property
    def default_cfg(self) -> PretrainedCfg:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: PretrainedCfg | dict) -> None:  # timm's build_model_with_cfg assigns it so
        self.pretrained_cfg = cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's
        name): training memory falls to about the blocks' inputs plus one block's activations, for
        one more forward pass of compute. Off by default."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """The parameters weight decay leaves out besides biases and norms (timm's optimizer factory
        asks for them): Eq. 3's relative-position tables, or [rw] the MLP that computes them."""
        return {name for name, _ in self.named_parameters() if ".relative_position." in name}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in the order of depth, for timm's layer-wise learning-rate decay: the stem,
        then each stage (``coarse``) or each block, then the head."""
        block = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(?:blocks\.)?(\d+)"
        return dict(stem=r"^stem", blocks=[(block, None), (r"^head_norm", (99999,))])

    def default_feature_indices(self) -> list[int]:
        """Indices into ``feature_info`` of the last stage at each resolution (S1..S4)."""
        info = self.feature_info
        return [i for i in range(1, len(info))
                if i == len(info) - 1 or info[i + 1]["reduction"] != info[i]["reduction"]]

    def feature_indices(self, indices: int | list[int] | tuple[int, ...] | None = None) -> list[int]:
        """Indices into ``feature_info`` as timm takes them: None, the last stage at each resolution
        (S1..S4); an int n, the last n; a list, where negative ones count from the end."""
        count = len(self.feature_info)
        integer = lambda i: isinstance(i, numbers.Integral) and not isinstance(i, bool)  # noqa: E731 (numpy's too)
        if indices is None:
            return self.default_feature_indices()
        if integer(indices):
            if not 0 < indices <= count:
                raise ValueError(f"feature indices {indices}: an int takes the last n of {count} (0: the stem, then "
                                 f"one per stage); give 1..{count}")
            return list(range(count - indices, count))
        if hasattr(indices, "__iter__") and not isinstance(indices, str):  # a tuple, a range, an array
            indices = list(indices)
        if not (isinstance(indices, list) and indices and all(map(integer, indices))):
            raise ValueError(f"feature indices {indices!r}: give an int n (the last n maps) or a list of ints into the "
                             f"{count} maps (0: the stem, then one per stage)")
        indices = [operator.index(i) for i in indices]
        bad = [i for i in indices if not -count <= i < count]
        if bad:
            raise ValueError(f"feature indices {bad} out of range 0..{count - 1} (0: the stem, then one per stage; "
                             f"negative ones count from the end)")
        picked = [i % count for i in indices]
        # The maps come in stage order, once each: in any other order, feature_info (which follows the
        # indices) would describe other maps than those given, without a word.
        if picked != sorted(set(picked)):
            raise ValueError(f"feature indices {indices} pick the maps {picked}; give them in increasing order, "
                             f"each once ({sorted(set(picked))}), as the stages give their maps")
        return picked

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """NCHW feature maps after the stages in ``indices`` (into ``feature_info``, as
        :meth:`feature_indices` reads them; 0 is the stem), with timm's arguments.

        The default is the last stage at each resolution: S1..S4, at strides 4, 8, 16 and 32 for the
        paper's models. Returns ``(final_features, maps)`` (``forward_features``'s output, and the maps
        as the stages give them), or only ``maps`` with ``intermediates_only``. ``norm``: the last
        stage's map normalised as ``forward_features`` gives it; ``stop_early``: no stage runs past
        the last map asked for (the final features are then that map).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: the maps are NCHW; pass 'NCHW' or nothing")
        indices = self.feature_indices(indices)
        x = self.forward_stem(x)
        maps = [x] if 0 in indices else []
        last = max(indices) if intermediates_only or stop_early else len(self.stages)
        for i, stage in enumerate(self.stages[:last], 1):
            x = stage(x)
            if i in indices:
                maps.append(self._norm_map(x) if norm and i == len(self.stages) else x)
        if intermediates_only:
            return maps
        return (self._norm_map(x) if last == len(self.stages) else x), maps

    def prune_intermediate_layers(self, indices: int | list[int] | None = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what ``forward_intermediates(x, indices)`` does not use (timm's name): the stages after
        the last map in ``indices``, the classifier and pre-logits (``prune_head``), and the head's
        norm (``prune_norm``; always when a stage goes, being the last stage's width). Returns the
        indices as :meth:`feature_indices` reads them.

        The model is then a backbone: ``forward_intermediates`` and ``forward_features`` give the kept
        stages' maps, and ``forward`` the last one (as timm's; pooled again after ``reset_classifier(N,
        "avg")``). It no longer fits its config, so ``save_pretrained`` refuses it: save its ``state_dict``.
        """
        take = self.feature_indices(indices)
        keep = max(take)  # stages S1..S_keep stay; index 0 is the stem
        if keep < len(self.stages) and not prune_head:
            raise ValueError(f"feature indices {take} leave out stages that the head reads; pass prune_head=True "
                             f"(the default) to drop the head with them")
        if prune_head:
            self.reset_classifier(0, "")
            self.pre_logits = nn.Identity()
        if prune_norm or keep < len(self.stages):
            self.head_norm = nn.Identity()
        self.stages = self.stages[:keep]
        self.feature_info = self.feature_info[:keep + 1]
        self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.head_hidden_size = self.num_features
        return take

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``; ``coatnet.from_pretrained`` reads it."""
        return save_pretrained(self, directory)


class FeatureInfo(list):
    """timm's ``feature_info`` of a feature extractor: one dict per map it returns, with timm's
    accessors (``channels``, ``reduction``, ``module_name``, ``get``, ``get_dicts``; ``idx`` an int or
    a list of them, into this list) and ``out_indices``, the maps' indices into the model's."""

    def __init__(self, info=(), out_indices: tuple[int, ...] = ()):
        super().__init__(info)
        self.out_indices = tuple(out_indices)

    def _each(self, idx: int | list[int] | tuple[int, ...] | None, read):
        """``read`` of the maps ``idx`` names, as timm's accessors take it: all (None), several, or one."""
        if idx is None:
            return [read(f) for f in self]
        if isinstance(idx, (tuple, list)):
            return [read(self[i]) for i in idx]
        return read(self[idx])

    def get(self, key: str, idx: int | list[int] | tuple[int, ...] | None = None):
        return self._each(idx, lambda f: f[key])

    def get_dicts(self, keys: list[str] | tuple[str, ...] | None = None,
                  idx: int | list[int] | tuple[int, ...] | None = None):
        return self._each(idx, lambda f: dict(f) if keys is None else {k: f[k] for k in keys})

    def channels(self, idx: int | list[int] | tuple[int, ...] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | list[int] | tuple[int, ...] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | list[int] | tuple[int, ...] | None = None):
        return self.get("module", idx)


class FeatureExtractor(nn.Module):
    """``create_model(name, features_only=True)``: the NCHW maps after the stages in ``out_indices``
    (into the model's ``feature_info``, as :meth:`CoAtNet.feature_indices` reads them: 0 is the stem,
    default S1..S4, an int n the last n, negative ones from the end), as timm's feature extractors
    give them, for detection and segmentation heads. What no map needs is dropped, as timm drops it:
    the head, and the stages after the last map (``prune_intermediate_layers``)."""

    def __init__(self, model: CoAtNet, out_indices: int | tuple[int, ...] | None = None):
        super().__init__()
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_norm=True))
        self.model = model
        self.feature_info = FeatureInfo((model.feature_info[i] for i in self.out_indices), self.out_indices)

    @property
    def config(self) -> CoAtNetConfig:
        """The network's config, as its model's (input size and channels, for ``data_transforms``)."""
        return self.model.config

    @property
    def pretrained_cfg(self) -> PretrainedCfg:
        """Its model's: how images are prepared for the weights."""
        return self.model.pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: PretrainedCfg) -> None:
        self.model.pretrained_cfg = cfg

    @property
    def default_cfg(self) -> PretrainedCfg:
        """timm's older name of :attr:`pretrained_cfg`, which timm's feature extractors carry too."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: PretrainedCfg | dict) -> None:
        self.pretrained_cfg = cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)

    def __prepare_scriptable__(self):
        raise TypeError(SCRIPT_REFUSED)  # as CoAtNet's


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, RelativePositionTable):
        nn.init.trunc_normal_(m.table, std=0.02)


# --------------------------------------------------------------------------------------------
# Named configurations
# --------------------------------------------------------------------------------------------


def _stages(layout: str, depths: tuple[int, ...], channels: tuple[int, ...]) -> tuple[StageConfig, ...]:
    """Stages S1..S4 from a layout string like "CCTT", one letter, depth and width per stage."""
    kind = {"C": "mbconv", "T": "transformer"}
    return tuple(StageConfig(kind[k], d, ch) for k, d, ch in zip(layout, depths, channels, strict=True))


def _paper_config(name: str, depths: tuple[int, ...], channels: tuple[int, ...], head_size: int = 32,
                  drop_path_rate: float = 0.0, layout: str = "CCTT") -> CoAtNetConfig:
    """A network of Table 3's form: ``depths`` of S1..S4 (S0, the stem, always has 2 layers) and
    ``channels`` of S0..S4.

    The head has a pre-logits layer (Linear + tanh, as wide as S4), as timm's paper-style CoAtNet
    does; without it every parameter count falls under the paper's, by up to 2.2% (CoAtNet-0).
    """
    return CoAtNetConfig(name=name, stem=StemConfig(channels[0]), stages=_stages(layout, depths, channels[1:]),
                         transformer=TransformerConfig(head_size=head_size), head=HeadConfig(channels[-1]),
                         drop_path_rate=drop_path_rate)


def plain_int(value):
    """``value`` with numpy's (or another library's) integers as Python's ints, in a tuple or list too: a class
    count computed with numpy (``labels.max() + 1``) is an integer, as timm and nn.Linear take it, and the
    config must hold plain ints to be written as JSON. Anything else (a bool, a float) is left to be checked."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (tuple, list)):
        return type(value)(plain_int(v) for v in value)
    return value


def build_model(config: CoAtNetConfig, **overrides) -> CoAtNet:
    """Build ``config`` with fields overridden by keyword; None leaves a field as it is.

    A part of the network (stem, mbconv, transformer, head) is overridden field by field with a
    dict, e.g. ``mbconv=dict(stride_on="depthwise")``; ``stages`` by a list of dicts.
    """
    base = config.to_dict()
    known = set(base) - {"version", "name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {config.name}; "
                         f"options: {', '.join(sorted(known))}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("num_classes", "in_chans", "img_size"):
            value = plain_int(value)
        if key in _PARTS and isinstance(value, dict):
            value = base[key] | value
        base[key] = value
    return CoAtNet(CoAtNetConfig.from_dict(base))


def _paper(params: float, **flops_at: float) -> PaperFigures:
    """Paper figures; FLOPs keyed like ``f224=4.2e9`` (Tables 4, 5, 13, 14)."""
    return PaperFigures(params=params, flops={int(k[1:]): v for k, v in flops_at.items()}, source="Tables 3-5, 13, 14")


@register_model(_paper(25e6, f224=4.2e9, f384=13.4e9))
def coatnet_0(**kwargs) -> CoAtNet:
    """CoAtNet-0 (Table 3): L=2,2,3,5,2, D=64,96,192,384,768; 25M params, 4.2B FLOPs at 224 (Table 4).

    Stochastic depth 0.2 (Table 10). ``mbconv=dict(stride_on="depthwise")`` gives the Table 9 variant (4.6B).
    """
    return build_model(_paper_config("coatnet_0", (2, 3, 5, 2), (64, 96, 192, 384, 768), drop_path_rate=0.2), **kwargs)


@register_model(_paper(42e6, f224=8.4e9, f384=27.4e9))
def coatnet_1(**kwargs) -> CoAtNet:
    """CoAtNet-1 (Table 3): L=2,2,6,14,2, D=64,96,192,384,768; 42M params, 8.4B FLOPs at 224.

    Stochastic depth 0.3 (Table 10).
    """
    return build_model(_paper_config("coatnet_1", (2, 6, 14, 2), (64, 96, 192, 384, 768), drop_path_rate=0.3), **kwargs)


@register_model(_paper(75e6, f224=15.7e9, f384=49.8e9, f512=96.7e9))
def coatnet_2(**kwargs) -> CoAtNet:
    """CoAtNet-2 (Table 3): L=2,2,6,14,2, D=128,128,256,512,1024; 75M params, 15.7B FLOPs at 224.

    Stochastic depth 0.5 (Table 10).
    """
    return build_model(_paper_config("coatnet_2", (2, 6, 14, 2), (128, 128, 256, 512, 1024), drop_path_rate=0.5),
                       **kwargs)


@register_model(_paper(168e6, f224=34.7e9, f384=107.4e9, f512=203.1e9))
def coatnet_3(**kwargs) -> CoAtNet:
    """CoAtNet-3 (Table 3): L=2,2,6,14,2, D=192,192,384,768,1536; 168M params, 34.7B FLOPs at 224.

    Stochastic depth 0.7 (Table 10).
    """
    return build_model(_paper_config("coatnet_3", (2, 6, 14, 2), (192, 192, 384, 768, 1536), drop_path_rate=0.7),
                       **kwargs)


@register_model(_paper(275e6, f384=189.5e9, f512=360.9e9))
def coatnet_4(**kwargs) -> CoAtNet:
    """CoAtNet-4 (Table 3): L=2,2,12,28,2, D=192,192,384,768,1536; 275M params (Table 5).

    The paper trains it on ImageNet-21K/JFT and gives no ImageNet-1K stochastic-depth rate: 0 here.
    """
    return build_model(_paper_config("coatnet_4", (2, 12, 28, 2), (192, 192, 384, 768, 1536)), **kwargs)


@register_model(_paper(688e6, f512=812e9))
def coatnet_5(**kwargs) -> CoAtNet:
    """CoAtNet-5 (Table 3): L=2,2,12,28,2, D=192,256,512,1280,2048, head size 64; 688M params."""
    return build_model(_paper_config("coatnet_5", (2, 12, 28, 2), (192, 256, 512, 1280, 2048), head_size=64), **kwargs)


def _split_s3_config(name: str, channels: tuple[int, int, int, int, int, int]) -> CoAtNetConfig:
    """CoAtNet-6/7 (Table 12): S3 is 8 MBConv blocks, then 42 Transformer blocks at a larger width."""
    s0, s1, s2, s3_conv, s3_tfm, s4 = channels
    stages = (StageConfig("mbconv", 2, s1), StageConfig("mbconv", 4, s2), StageConfig("mbconv", 8, s3_conv),
              StageConfig("transformer", 42, s3_tfm, stride=1), StageConfig("transformer", 2, s4))
    return CoAtNetConfig(name=name, stem=StemConfig(s0), stages=stages, transformer=TransformerConfig(head_size=128),
                         head=HeadConfig(s4))


@register_model(_paper(1.47e9, f512=1521e9))
def coatnet_6(**kwargs) -> CoAtNet:
    """CoAtNet-6 (Table 12): S0 2/192, S1 2/192, S2 4/384, S3 8 MBConv/768 + 42 TFM/1536, S4 2/2048.

    Head size 128; 1.47B params reported.
    """
    return build_model(_split_s3_config("coatnet_6", (192, 192, 384, 768, 1536, 2048)), **kwargs)


@register_model(_paper(2.44e9, f512=2586e9))
def coatnet_7(**kwargs) -> CoAtNet:
    """CoAtNet-7 (Table 12): S0 2/192, S1 2/256, S2 4/512, S3 8 MBConv/1024 + 42 TFM/2048, S4 2/3072.

    Head size 128; 2.44B params reported.
    """
    return build_model(_split_s3_config("coatnet_7", (192, 256, 512, 1024, 2048, 3072)), **kwargs)


# The controlled study of Section 2.2 (Figure 1): five layouts "of similar parameter count and
# cost". Our size rule: the four multi-stage layouts keep CoAtNet-0's stem and widths (S0..S4 =
# 64, 96, 192, 384, 768) and depths (S1..S4 = 2, 3, 5, 2), only the block type of S2..S4 changes;
# where S3 is MBConv it has 7 blocks instead of 5, because an MBConv block has about 0.7x the
# parameters of a Transformer block of the same width. VIT_REL is a 16x16 patch stem and 14
# relative-attention blocks at width 384 (CoAtNet-0's S3 width, head size 32). All five land at
# 24-27M parameters. No stochastic depth: the study trains without regularisation.

_STUDY_WIDTHS = (64, 96, 192, 384, 768)


@register_model()
def vit_rel(**kwargs) -> CoAtNet:
    """VIT_REL (Section 2.2): ViT stem (16x16 patches), then 14 TFM_Rel blocks at width 384."""
    stages = (StageConfig("transformer", 14, 384, stride=1),)
    return build_model(CoAtNetConfig(name="vit_rel", stem=StemConfig(384, kind="patch", stride=16), stages=stages,
                                     head=HeadConfig(384)), **kwargs)


@register_model()
def c_c_c_c(**kwargs) -> CoAtNet:
    """C-C-C-C (Section 2.2): MBConv in S1..S4, depths 2, 3, 7, 2 at CoAtNet-0's widths."""
    return build_model(_paper_config("c_c_c_c", (2, 3, 7, 2), _STUDY_WIDTHS, layout="CCCC"), **kwargs)


@register_model()
def c_c_c_t(**kwargs) -> CoAtNet:
    """C-C-C-T (Section 2.2): MBConv in S1..S3, Transformer in S4, depths 2, 3, 7, 2."""
    return build_model(_paper_config("c_c_c_t", (2, 3, 7, 2), _STUDY_WIDTHS, layout="CCCT"), **kwargs)


@register_model()
def c_c_t_t(**kwargs) -> CoAtNet:
    """C-C-T-T (Section 2.2): CoAtNet-0's network, without stochastic depth."""
    return build_model(_paper_config("c_c_t_t", (2, 3, 5, 2), _STUDY_WIDTHS, layout="CCTT"), **kwargs)


@register_model()
def c_t_t_t(**kwargs) -> CoAtNet:
    """C-T-T-T (Section 2.2): MBConv in S1, Transformer in S2..S4, depths 2, 3, 5, 2."""
    return build_model(_paper_config("c_t_t_t", (2, 3, 5, 2), _STUDY_WIDTHS, layout="CTTT"), **kwargs)


# Small models for CPU work and small images: ours, not the paper's. The stem keeps full
# resolution (stride 1), so the network's stride is 16 and a 32x32 input still reaches S4 as a
# 2x2 grid instead of 1x1. Same blocks and C-C-T-T layout; no pre-logits layer.


def _small_config(name: str, depths: tuple[int, ...], channels: tuple[int, ...]) -> CoAtNetConfig:
    return CoAtNetConfig(name=name, stem=StemConfig(channels[0], stride=1),
                         stages=_stages("CCTT", depths, channels[1:]), img_size=(32, 32))


@register_model()
def coatnet_pico(**kwargs) -> CoAtNet:
    """Ours, not the paper's: C-C-T-T, L=1,1,1,2,1, D=16,32,64,128,256, stride-1 stem, 32x32 input (1.4M)."""
    return build_model(_small_config("coatnet_pico", (1, 1, 2, 1), (16, 32, 64, 128, 256)), **kwargs)


@register_model()
def coatnet_nano(**kwargs) -> CoAtNet:
    """Ours, not the paper's: C-C-T-T, L=2,2,2,3,2, D=32,48,96,192,384, stride-1 stem, 32x32 input (5.3M)."""
    return build_model(_small_config("coatnet_nano", (2, 2, 3, 2), (32, 48, 96, 192, 384)), **kwargs)


# timm's "rw" variants: not the paper's configurations but Ross Wightman's, trained for timm before
# the paper's code was public; timm publishes ImageNet weights for most of them, which
# `coatnet convert-timm` turns into ours. Same C-C-T-T layout and blocks in a dialect of the
# paper's, below: a narrower first stem conv without the second's bias, SiLU in the stem and
# MBConv, widths expanded from a block's input, MBConv strided on the depthwise conv, 2x2 average
# pooling, norms with eps 1e-6 and the head's applied before the pooling, no pre-logits layer, no
# stochastic depth by default. Each variant then changes a few fields. Named as in timm, less the
# resolution suffix.

_RW_STEM = dict(bias=False, activation="silu")
_RW_MBCONV = MBConvConfig(stride_on="depthwise", pool="avg", activation="silu", expand_from="input",
                          pre_norm_activation=True, se_activation="relu", output_bias=False)
_RW_TRANSFORMER = TransformerConfig(pool="avg", attention_width="input", norm_eps=1e-6)
_RW_HEAD = HeadConfig(norm_eps=1e-6, norm_before_pool=True)
# The two smallest follow timm's MaxViT-style defaults: plain pre-norm, biased MBConv outputs, SiLU in SE.
_RW_MAX_STYLE = dict(pre_norm_activation=False, output_bias=True, se_activation="silu")
_RW_NANO, _RW_0, _RW_2, _RW_3 = (64, 128, 256, 512), (96, 192, 384, 768), (128, 256, 512, 1024), (192, 384, 768, 1536)


def _timm_rw_config(name: str, depths: tuple[int, ...], channels: tuple[int, ...], stem: tuple[int, int] = (32, 64),
                    mbconv: dict | None = None, transformer: dict | None = None) -> CoAtNetConfig:
    """A timm rw CoAtNet: S1..S4 depths and widths, the stem's two widths, and the variant's own
    MBConv and Transformer fields over the dialect's (timm's ``_rw_coat_cfg``)."""
    return CoAtNetConfig(name=name, stem=StemConfig(stem[1], mid_channels=stem[0], **_RW_STEM),
                         stages=_stages("CCTT", depths, channels), mbconv=replace(_RW_MBCONV, **(mbconv or {})),
                         transformer=replace(_RW_TRANSFORMER, **(transformer or {})), head=_RW_HEAD)


@register_model()
def coatnet_nano_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_nano_rw_224, not the paper's: L=3,4,6,3, D=64..512; MBConv strides by pooling."""
    return build_model(_timm_rw_config("coatnet_nano_rw", (3, 4, 6, 3), _RW_NANO,
                                       mbconv=dict(stride_on="pool", **_RW_MAX_STYLE)), **kwargs)


@register_model()
def coatnet_0_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_0_rw_224, not the paper's CoAtNet-0: L=2,3,7,2 (deeper S3), D=96..768; MBConv
    strides by pooling, SE before the depthwise BatchNorm; no bias on the Transformer shortcut."""
    return build_model(_timm_rw_config("coatnet_0_rw", (2, 3, 7, 2), _RW_0,
                                       mbconv=dict(stride_on="pool", se_before_norm=True),
                                       transformer=dict(shortcut_bias=False)), **kwargs)


@register_model()
def coatnet_1_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_1_rw_224, not the paper's CoAtNet-1: L=2,6,14,2, D=96..768; SE before the
    depthwise BatchNorm; no bias on the Transformer shortcut."""
    return build_model(_timm_rw_config("coatnet_1_rw", (2, 6, 14, 2), _RW_0, mbconv=dict(se_before_norm=True),
                                       transformer=dict(shortcut_bias=False)), **kwargs)


@register_model()
def coatnet_2_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_2_rw_224, not the paper's CoAtNet-2: L=2,6,14,2, D=128..1024, stem 64/128; SiLU in SE."""
    return build_model(_timm_rw_config("coatnet_2_rw", (2, 6, 14, 2), _RW_2, stem=(64, 128),
                                       mbconv=dict(se_activation="silu")), **kwargs)


@register_model()
def coatnet_3_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_3_rw_224, not the paper's CoAtNet-3: L=2,6,14,2, D=192..1536, stem 96/192; SiLU
    in SE, layer scale 1e-6 on the Transformer branches."""
    return build_model(_timm_rw_config("coatnet_3_rw", (2, 6, 14, 2), _RW_3, stem=(96, 192),
                                       mbconv=dict(se_activation="silu"), transformer=dict(layer_scale_init=1e-6)),
                       **kwargs)


@register_model()
def coatnet_bn_0_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_bn_0_rw_224: coatnet_0_rw's network, strided on the depthwise conv, with
    BatchNorm instead of LayerNorm in the Transformer blocks and the head."""
    config = _timm_rw_config("coatnet_bn_0_rw", (2, 3, 7, 2), _RW_0, mbconv=dict(se_before_norm=True),
                             transformer=dict(shortcut_bias=False, norm="batchnorm"))
    return build_model(replace(config, head=replace(_RW_HEAD, norm="batchnorm")), **kwargs)


@register_model()
def coatnet_rmlp_nano_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_nano_rw_224: L=3,4,6,3, D=64..512, MLP relative position bias (width 384)."""
    return build_model(_timm_rw_config("coatnet_rmlp_nano_rw", (3, 4, 6, 3), _RW_NANO, mbconv=_RW_MAX_STYLE,
                                       transformer=dict(relative_position="mlp", relative_position_mlp_width=384)),
                       **kwargs)


@register_model()
def coatnet_rmlp_0_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_0_rw_224 (no published weights): coatnet_0_rw's depths, MLP relative position bias."""
    return build_model(_timm_rw_config("coatnet_rmlp_0_rw", (2, 3, 7, 2), _RW_0,
                                       transformer=dict(relative_position="mlp")), **kwargs)


@register_model()
def coatnet_rmlp_1_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_1_rw_224: L=2,6,14,2, D=96..768; MBConv strides by pooling, 3x3 max Pool on
    the shortcuts and in attention, SE before the depthwise BatchNorm, MLP relative position bias (384)."""
    return build_model(_timm_rw_config("coatnet_rmlp_1_rw", (2, 6, 14, 2), _RW_0,
                                       mbconv=dict(stride_on="pool", pool="max3x3", se_before_norm=True),
                                       transformer=dict(pool="max3x3", shortcut_bias=False, relative_position="mlp",
                                                        relative_position_mlp_width=384)), **kwargs)


@register_model()
def coatnet_rmlp_1_rw2(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_1_rw2_224: L=2,6,14,2, D=96..768, MLP relative position bias."""
    return build_model(_timm_rw_config("coatnet_rmlp_1_rw2", (2, 6, 14, 2), _RW_0,
                                       transformer=dict(relative_position="mlp")), **kwargs)


@register_model()
def coatnet_rmlp_2_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_2_rw_224 (and _384 at img_size=384): coatnet_2_rw with layer scale 1e-6
    and the MLP relative position bias."""
    return build_model(_timm_rw_config("coatnet_rmlp_2_rw", (2, 6, 14, 2), _RW_2, stem=(64, 128),
                                       mbconv=dict(se_activation="silu"),
                                       transformer=dict(layer_scale_init=1e-6, relative_position="mlp")), **kwargs)


@register_model()
def coatnet_rmlp_3_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_3_rw_224 (no published weights): coatnet_3_rw with the MLP relative position bias."""
    return build_model(_timm_rw_config("coatnet_rmlp_3_rw", (2, 6, 14, 2), _RW_3, stem=(96, 192),
                                       mbconv=dict(se_activation="silu"),
                                       transformer=dict(layer_scale_init=1e-6, relative_position="mlp")), **kwargs)


# timm's names for these networks (its name adds the input size), each with the tags of the weights
# timm publishes under it (Hugging Face repositories timm/NAME.TAG), timm's default first (what
# pretrained=True loads for a name without a tag), and its paper-style names for CoAtNet-0..5. A
# name may carry its tag, as in timm: create_model("coatnet_0_rw_224.sw_in1k").
for _ours, _tags in (("coatnet_nano_rw", ("sw_in1k",)), ("coatnet_0_rw", ("sw_in1k",)),
                     ("coatnet_1_rw", ("sw_in1k",)), ("coatnet_2_rw", ("sw_in12k_ft_in1k", "sw_in12k")),
                     ("coatnet_3_rw", ("sw_in12k",)), ("coatnet_bn_0_rw", ("sw_in1k",)),
                     ("coatnet_rmlp_nano_rw", ("sw_in1k",)), ("coatnet_rmlp_0_rw", ()),
                     ("coatnet_rmlp_1_rw", ("sw_in1k",)), ("coatnet_rmlp_1_rw2", ("sw_in12k_ft_in1k", "sw_in12k")),
                     ("coatnet_rmlp_2_rw", ("sw_in12k_ft_in1k", "sw_in12k", "sw_in1k")), ("coatnet_rmlp_3_rw", ())):
    register_alias(f"{_ours}_224", _ours, _tags)
register_alias("coatnet_rmlp_2_rw_384", "coatnet_rmlp_2_rw", ("sw_in12k_ft_in1k",), img_size=384)
for _i in range(6):
    register_alias(f"coatnet_{_i}_224", f"coatnet_{_i}")
