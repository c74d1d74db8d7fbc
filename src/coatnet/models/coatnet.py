"""CoAtNet: depthwise convolution and relative self-attention, stacked C-C-T-T.

Dai, Liu, Le, Tan. "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021
(arXiv:2106.04803). Equation, table and appendix numbers in the comments are the paper's.

The file reads top to bottom: configuration dataclasses, the building blocks (S0 stem, MBConv,
relative attention, Transformer block), the network, then the named configurations: CoAtNet-0..7
(Tables 3, 11, 12), the five layouts of the controlled study (Section 2.2) and two small models
of ours for CPU work on small images.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation, StochasticDepth

from .registry import PaperFigures, register_model

__all__ = ["StageConfig", "CoAtNetConfig", "CoAtNet", "MBConv", "RelativeAttention", "TransformerBlock"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """One stage: ``depth`` blocks of one type, ``channels`` wide.

    The first block changes the width and, when ``stride`` is 2, halves the resolution on both of
    its branches (Appendix A.1). CoAtNet-6/7 split S3 in two: MBConv blocks, then Transformer
    blocks at a larger width with ``stride=1``.
    """

    block: Literal["mbconv", "transformer"]
    depth: int
    channels: int
    stride: int = 2


@dataclass(frozen=True)
class CoAtNetConfig:
    """Everything that defines a network; ``CoAtNet(config)`` builds it.

    ``img_size`` sizes the relative-position tables (one (2H-1)x(2W-1) table per head and layer,
    for the H x W grid the stage sees at that input size); other input sizes still work, with the
    tables interpolated (Section 2.1).
    """

    name: str
    stem_channels: int
    stages: tuple[StageConfig, ...]
    stem: Literal["conv", "patch"] = "conv"  # "patch": the ViT stem of VIT_REL (Section 2.2)
    stem_stride: int = 2  # conv stem: stride of its first conv; patch stem: the patch size
    head_size: int = 32  # attention head size (Table 3)
    expand_ratio: int = 4  # inverted bottleneck of MBConv and the FFN (Section 2.1)
    se_ratio: float = 0.25  # SE squeeze width relative to the block's output width
    downsample_on_depthwise: bool = False  # Table 9: stride 2 on the depthwise conv, not the 1x1
    head_hidden_size: int | None = None  # pre-logits Linear+tanh before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linear in block index (Table 10 rates)
    num_classes: int = 1000
    in_chans: int = 3
    img_size: tuple[int, int] = (224, 224)

    def __post_init__(self) -> None:
        img = self.img_size
        img = (img, img) if isinstance(img, int) else tuple(img)
        object.__setattr__(self, "img_size", img)
        object.__setattr__(self, "stages", tuple(StageConfig(**s) if isinstance(s, dict) else s for s in self.stages))
        if self.stem not in ("conv", "patch"):
            raise ValueError(f"stem must be 'conv' or 'patch', got {self.stem!r}")
        for s in self.stages:
            if s.block not in ("mbconv", "transformer"):
                raise ValueError(f"stage block must be 'mbconv' or 'transformer', got {s.block!r}")
            if s.block == "transformer" and s.channels % self.head_size:
                raise ValueError(f"transformer width {s.channels} is not a multiple of head size {self.head_size}")
        if any(side <= 0 or side % self.stride for side in img):
            near = [max(self.stride, math.ceil(side / self.stride) * self.stride) for side in img]
            raise ValueError(f"img_size {img[0]}x{img[1]} is not a multiple of the model's stride {self.stride}; "
                             f"use e.g. {near[0]}x{near[1]}")

    @property
    def stride(self) -> int:
        """Total down-sampling from input to the last feature map (32 for the paper's models)."""
        return self.stem_stride * math.prod(s.stride for s in self.stages)

    @property
    def num_features(self) -> int:
        return self.stages[-1].channels

    @property
    def layout(self) -> str:
        """The paper's name for the vertical layout, e.g. 'C-C-T-T' or 'VIT_REL'."""
        if self.stem == "patch":
            return "VIT_REL"
        return "-".join("C" if s.block == "mbconv" else "T" for s in self.stages)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stages"] = [vars(s).copy() for s in self.stages]
        d["img_size"] = list(self.img_size)
        return d

    def __str__(self) -> str:
        rows = [f"{self.name}: {self.layout}, input {self.in_chans}x{self.img_size[0]}x{self.img_size[1]}, "
                f"{self.num_classes} classes, head size {self.head_size}, drop path {self.drop_path_rate}"]
        stem = "patch" if self.stem == "patch" else "conv stem"
        rows.append(f"  S0  {stem:<11} x{1 if self.stem == 'patch' else 2:<2} {self.stem_channels:>5} ch  "
                    f"stride {self.stem_stride}")
        for i, s in enumerate(self.stages, 1):
            rows.append(f"  S{i}  {s.block:<11} x{s.depth:<2} {s.channels:>5} ch  stride {s.stride}")
        head = f"pre-logits {self.head_hidden_size} + " if self.head_hidden_size else ""
        rows.append(f"  head  avg-pool + LayerNorm + {head}linear {self.num_classes}")
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def conv_bn_gelu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv -> BatchNorm -> GELU, the post-activation unit inside the stem and MBConv."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, stride=stride, groups=groups,
                                norm_layer=nn.BatchNorm2d, activation_layer=nn.GELU, inplace=None)


def conv_stem(in_chans: int, channels: int, stride: int) -> nn.Sequential:
    """S0: a 2-layer convolutional stem, 3x3 with ``stride`` then 3x3 (Section 2.2).

    Its output enters the residual stream un-normalized: every block after it is pre-norm.
    """
    return nn.Sequential(
        conv_bn_gelu(in_chans, channels, 3, stride=stride),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class MBConv(nn.Module):
    """Pre-activation MBConv with squeeze-excitation: ``x + Module(BatchNorm(x))``.

    Module = 1x1 conv (expand x4) -> depthwise 3x3 -> SE (0.25) -> 1x1 conv, BatchNorm and GELU
    between. The expansion is taken from the output width, as in the inverted bottleneck of the FFN.
    With ``stride=2`` (Eq. 5): ``x <- Proj(Pool(x)) + Conv(DepthConv(Conv(Norm(x), stride=2)))``,
    the stride on the first 1x1 conv; ``stride_on_depthwise`` moves it to the depthwise conv
    (the Table 9 variant).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expand_ratio: int = 4,
                 se_ratio: float = 0.25, stride_on_depthwise: bool = False, drop_path: float = 0.0):
        super().__init__()
        hidden = out_channels * expand_ratio
        self.shortcut = _shortcut_2d(in_channels, out_channels, stride)
        expand_stride, depthwise_stride = (1, stride) if stride_on_depthwise else (stride, 1)
        self.residual = nn.Sequential(OrderedDict(
            norm=nn.BatchNorm2d(in_channels),
            expand=conv_bn_gelu(in_channels, hidden, 1, stride=expand_stride),
            depthwise=conv_bn_gelu(hidden, hidden, 3, stride=depthwise_stride, groups=hidden),
            se=SqueezeExcitation(hidden, max(1, int(out_channels * se_ratio)), activation=nn.GELU),
            project=nn.Conv2d(hidden, out_channels, 1),
        ))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.drop_path(self.residual(x))


def _shortcut_2d(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity branch: Proj(Pool(x)) when the block down-samples or changes width (A.1)."""
    layers = []
    if stride > 1:
        layers.append(nn.MaxPool2d(stride, stride))
    if in_channels != out_channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 1))
    return nn.Sequential(*layers) if layers else nn.Identity()


def max_pool_tokens(x: Tensor, height: int, width: int) -> Tensor:
    """2x2 max-pool, stride 2, of a (B, H*W, C) token sequence laid out row by row."""
    b, _, c = x.shape
    return x.reshape(b, height // 2, 2, width // 2, 2, c).amax(dim=(2, 4)).reshape(b, -1, c)


@functools.lru_cache(maxsize=64)
def relative_position_index(height: int, width: int, device: torch.device) -> Tensor:
    """(N, N) index into a flattened (2H-1)x(2W-1) table: entry (p, p') is the offset p - p'."""
    with torch.inference_mode(False):  # cached across calls, so never an inference-mode tensor
        rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                    indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        dr = rows[:, None] - rows[None, :] + height - 1
        dc = cols[:, None] - cols[None, :] + width - 1
        return dr * (2 * width - 1) + dc


def resize_relative_table(table: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly interpolate (heads, 2H-1, 2W-1) tables to (heads, *size) (Section 2.1).

    ``align_corners=True`` keeps offset 0 at the centre and the largest offsets at the edges.
    """
    if tuple(table.shape[-2:]) == tuple(size):
        return table
    return F.interpolate(table.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=True)[0].to(table.dtype)


class RelativeAttention(nn.Module):
    """Multi-head self-attention with a pre-softmax relative position bias (Eq. 3).

    ``y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w_{i-j}) v_j``: w is an input-independent scalar
    per relative offset and head, held in a trainable (2H-1)x(2W-1) table per head; the bias
    between positions (r, c) and (r', c') is ``P[r-r'+H-1, c-c'+W-1]``. Not shared across layers.
    For a grid other than ``grid_size`` the table is bilinearly interpolated, and a state dict
    saved at another size is interpolated on load. Without autograd (inference), the gathered
    (heads, N, N) bias is cached per grid size and rebuilt only when the table changes.
    """

    def __init__(self, in_dim: int, out_dim: int, head_size: int, grid_size: tuple[int, int]):
        super().__init__()
        self.num_heads = out_dim // head_size
        self.head_size = head_size
        self.qkv = nn.Linear(in_dim, 3 * out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        height, width = grid_size
        self.relative_position_table = nn.Parameter(torch.zeros(self.num_heads, 2 * height - 1, 2 * width - 1))
        self._bias_cache: dict[tuple, Tensor] = {}

    def relative_position_bias(self, height: int, width: int) -> Tensor:
        """The (heads, H*W, H*W) bias for an H x W grid, gathered from the (resized) table."""
        table = resize_relative_table(self.relative_position_table, (2 * height - 1, 2 * width - 1))
        return table.flatten(1)[:, relative_position_index(height, width, table.device)]

    def _bias(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.relative_position_bias(height, width).to(dtype)
        table = self.relative_position_table
        # The key changes when the table is updated in place (optimizer step, load_state_dict:
        # _version) or moved (.to(): data_ptr), so a stale bias is never used.
        key = (height, width, dtype, table.device, table.data_ptr(), table._version)
        bias = self._bias_cache.get(key)
        if bias is None:
            self._bias_cache = {k: v for k, v in self._bias_cache.items() if k[:2] != (height, width)}
            bias = self._bias_cache[key] = self.relative_position_bias(height, width).to(dtype)
        return bias

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(height, width, q.dtype))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "relative_position_table"
        table = state_dict.get(key)
        mine = self.relative_position_table
        if table is not None and table.dim() == 3 and table.shape[0] == mine.shape[0] and table.shape != mine.shape:
            state_dict[key] = resize_relative_table(table, tuple(mine.shape[1:]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block with relative attention (TFM_Rel) on a (B, H*W, C) sequence.

    ``x <- x + Attention(LayerNorm(x))``, then ``x <- x + FFN(LayerNorm(x))`` with a x4 GELU FFN.
    With ``downsample`` (Eq. 4): ``x <- Proj(Pool(x)) + Attention(Pool(Norm(x)))``, Pool a 2x2
    max-pool with stride 2 and Proj a linear map to the new width.
    """

    def __init__(self, in_dim: int, out_dim: int, head_size: int, grid_size: tuple[int, int],
                 downsample: bool = False, expand_ratio: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.downsample = downsample
        self.shortcut = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()
        self.attn_norm = nn.LayerNorm(in_dim)
        self.attn = RelativeAttention(in_dim, out_dim, head_size, grid_size)
        self.ffn_norm = nn.LayerNorm(out_dim)
        self.ffn = nn.Sequential(nn.Linear(out_dim, expand_ratio * out_dim), nn.GELU(),
                                 nn.Linear(expand_ratio * out_dim, out_dim))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``height`` x ``width`` is the input grid; the output grid is half of it when down-sampling."""
        y = self.attn_norm(x)
        if self.downsample:
            x, y = max_pool_tokens(x, height, width), max_pool_tokens(y, height, width)
            height, width = height // 2, width // 2
        x = self.shortcut(x) + self.drop_path(self.attn(y, height, width))
        return x + self.drop_path(self.ffn(self.ffn_norm(x)))


class TransformerStage(nn.Module):
    """A stage of Transformer blocks: NCHW in and out, a token sequence inside."""

    def __init__(self, blocks: list[TransformerBlock], stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        for i, block in enumerate(self.blocks):
            x = block(x, height, width)
            if i == 0:
                height, width = height // self.stride, width // self.stride
        return x.transpose(1, 2).reshape(b, -1, height, width)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


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
        c = config
        if c.stem == "patch":
            self.stem = nn.Conv2d(c.in_chans, c.stem_channels, c.stem_stride, stride=c.stem_stride)
        else:
            self.stem = conv_stem(c.in_chans, c.stem_channels, c.stem_stride)

        total_blocks = sum(s.depth for s in c.stages)
        # Stochastic depth grows linearly with the block index, from 0 to drop_path_rate.
        rates = [c.drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        grid = (c.img_size[0] // c.stem_stride, c.img_size[1] // c.stem_stride)
        in_ch, reduction, index = c.stem_channels, c.stem_stride, 0
        self.feature_info = [dict(num_chs=in_ch, reduction=reduction, module="stem")]
        stages = []
        for i, s in enumerate(c.stages):
            grid = (grid[0] // s.stride, grid[1] // s.stride)
            blocks = []
            for j in range(s.depth):
                first = j == 0
                block_in, stride, drop = (in_ch if first else s.channels), (s.stride if first else 1), rates[index]
                index += 1
                if s.block == "mbconv":
                    blocks.append(MBConv(block_in, s.channels, stride, c.expand_ratio, c.se_ratio,
                                         c.downsample_on_depthwise, drop))
                else:
                    blocks.append(TransformerBlock(block_in, s.channels, c.head_size, grid, stride == 2,
                                                   c.expand_ratio, drop))
            stages.append(nn.Sequential(*blocks) if s.block == "mbconv" else TransformerStage(blocks, s.stride))
            in_ch, reduction = s.channels, reduction * s.stride
            self.feature_info.append(dict(num_chs=in_ch, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)

        self.num_features = c.num_features
        self.head_hidden_size = c.head_hidden_size or c.num_features
        self.head_norm = nn.LayerNorm(self.num_features)
        self.pre_logits = (nn.Sequential(nn.Linear(self.num_features, c.head_hidden_size), nn.Tanh())
                           if c.head_hidden_size else nn.Identity())
        self.num_classes = c.num_classes
        self.classifier = nn.Linear(self.head_hidden_size, c.num_classes) if c.num_classes else nn.Identity()
        self.apply(_init_weights)

    # -- timm-style interface ----------------------------------------------------------------

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError, saying what was expected, for a batch this model cannot take."""
        c = self.config
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected a 4-D batch (N, C, H, W), got {shape}; add a batch dimension with x[None]")
        if x.shape[1] != c.in_chans:
            raise ValueError(f"expected {c.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                             f"build the model with in_chans={x.shape[1]} or convert the images")
        height, width = x.shape[-2:]
        if height % c.stride or width % c.stride:
            near = [max(c.stride, math.ceil(side / c.stride) * c.stride) for side in (height, width)]
            raise ValueError(f"input size {height}x{width} is not a multiple of the model's stride {c.stride}; "
                             f"resize or crop to e.g. {near[0]}x{near[1]}")

    def forward_features(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pre_logits(self.head_norm(x.mean(dim=(2, 3))))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier)."""
        self.num_classes = num_classes
        self.config = replace(self.config, num_classes=num_classes)
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        self.classifier.apply(_init_weights)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def default_feature_indices(self) -> list[int]:
        """Indices into ``feature_info`` of the last stage at each resolution (S1..S4)."""
        info = self.feature_info
        return [i for i in range(1, len(info)) if i == len(info) - 1 or info[i + 1]["reduction"] != info[i]["reduction"]]

    def forward_intermediates(self, x: Tensor, indices: list[int] | None = None,
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """NCHW feature maps after the stages in ``indices`` (into ``feature_info``; 0 is the stem).

        The default is the last stage at each resolution: S1..S4, at strides 4, 8, 16 and 32 for the
        paper's models. Returns ``(final_features, maps)``, or only ``maps`` with ``intermediates_only``.
        """
        indices = self.default_feature_indices() if indices is None else list(indices)
        bad = [i for i in indices if not 0 <= i < len(self.feature_info)]
        if bad:
            raise ValueError(f"feature indices {bad} out of range 0..{len(self.feature_info) - 1}")
        self.check_input(x)
        x = self.stem(x)
        maps = [x] if 0 in indices else []
        last = max(indices) if intermediates_only else len(self.stages)
        for i, stage in enumerate(self.stages[:last], 1):
            x = stage(x)
            if i in indices:
                maps.append(x)
        return maps if intermediates_only else (x, maps)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, RelativeAttention):
        nn.init.trunc_normal_(m.relative_position_table, std=0.02)


# --------------------------------------------------------------------------------------------
# Named configurations
# --------------------------------------------------------------------------------------------


def _stages(layout: str, depths: tuple[int, ...], channels: tuple[int, ...]) -> tuple[StageConfig, ...]:
    """Stages from a layout string like "CCTT" (one letter per stage S1..S4)."""
    kind = {"C": "mbconv", "T": "transformer"}
    return tuple(StageConfig(kind[k], d, ch) for k, d, ch in zip(layout, depths, channels))


def _paper_config(name: str, depths: tuple[int, ...], channels: tuple[int, ...], head_size: int = 32,
                  drop_path_rate: float = 0.0, layout: str = "CCTT") -> CoAtNetConfig:
    """A 5-stage C-C-T-T network: L and D list S0..S4 as in Table 3.

    The head has a pre-logits layer (Linear + tanh, as wide as S4), as timm's paper-style CoAtNet
    does; without it every parameter count falls under the paper's, by up to 2.2% (CoAtNet-0).
    """
    return CoAtNetConfig(name=name, stem_channels=channels[0], stages=_stages(layout, depths[1:], channels[1:]),
                         head_size=head_size, head_hidden_size=channels[-1], drop_path_rate=drop_path_rate)


def _build(config: CoAtNetConfig, **kwargs) -> CoAtNet:
    """Build ``config`` with any field overridden by keyword (num_classes, img_size, ...)."""
    known = {f.name for f in fields(CoAtNetConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {config.name}; "
                         f"options: {', '.join(sorted(known - {'name', 'stages'}))}")
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    return CoAtNet(replace(config, **overrides))


def _paper(params: float, **flops_at: float) -> PaperFigures:
    """Paper figures; FLOPs keyed like ``f224=4.2e9`` (Tables 4, 5, 13, 14)."""
    return PaperFigures(params=params, flops={int(k[1:]): v for k, v in flops_at.items()}, source="Tables 3-5, 13, 14")


@register_model(_paper(25e6, f224=4.2e9, f384=13.4e9))
def coatnet_0(**kwargs) -> CoAtNet:
    """CoAtNet-0 (Table 3): L=2,2,3,5,2, D=64,96,192,384,768; 25M params, 4.2B FLOPs at 224 (Table 4).

    Stochastic depth 0.2 (Table 10). ``downsample_on_depthwise=True`` gives the Table 9 variant (4.6B).
    """
    return _build(_paper_config("coatnet_0", (2, 2, 3, 5, 2), (64, 96, 192, 384, 768), drop_path_rate=0.2), **kwargs)


@register_model(_paper(42e6, f224=8.4e9, f384=27.4e9))
def coatnet_1(**kwargs) -> CoAtNet:
    """CoAtNet-1 (Table 3): L=2,2,6,14,2, D=64,96,192,384,768; 42M params, 8.4B FLOPs at 224.

    Stochastic depth 0.3 (Table 10).
    """
    return _build(_paper_config("coatnet_1", (2, 2, 6, 14, 2), (64, 96, 192, 384, 768), drop_path_rate=0.3), **kwargs)


@register_model(_paper(75e6, f224=15.7e9, f384=49.8e9, f512=96.7e9))
def coatnet_2(**kwargs) -> CoAtNet:
    """CoAtNet-2 (Table 3): L=2,2,6,14,2, D=128,128,256,512,1024; 75M params, 15.7B FLOPs at 224.

    Stochastic depth 0.5 (Table 10).
    """
    return _build(_paper_config("coatnet_2", (2, 2, 6, 14, 2), (128, 128, 256, 512, 1024), drop_path_rate=0.5),
                  **kwargs)


@register_model(_paper(168e6, f224=34.7e9, f384=107.4e9, f512=203.1e9))
def coatnet_3(**kwargs) -> CoAtNet:
    """CoAtNet-3 (Table 3): L=2,2,6,14,2, D=192,192,384,768,1536; 168M params, 34.7B FLOPs at 224.

    Stochastic depth 0.7 (Table 10).
    """
    return _build(_paper_config("coatnet_3", (2, 2, 6, 14, 2), (192, 192, 384, 768, 1536), drop_path_rate=0.7),
                  **kwargs)


@register_model(_paper(275e6, f384=189.5e9, f512=360.9e9))
def coatnet_4(**kwargs) -> CoAtNet:
    """CoAtNet-4 (Table 3): L=2,2,12,28,2, D=192,192,384,768,1536; 275M params (Table 5).

    The paper trains it on ImageNet-21K/JFT and gives no ImageNet-1K stochastic-depth rate: 0 here.
    """
    return _build(_paper_config("coatnet_4", (2, 2, 12, 28, 2), (192, 192, 384, 768, 1536)), **kwargs)


@register_model(_paper(688e6, f512=812e9))
def coatnet_5(**kwargs) -> CoAtNet:
    """CoAtNet-5 (Table 3): L=2,2,12,28,2, D=192,256,512,1280,2048, head size 64; 688M params."""
    return _build(_paper_config("coatnet_5", (2, 2, 12, 28, 2), (192, 256, 512, 1280, 2048), head_size=64), **kwargs)


def _split_s3_config(name: str, channels: tuple[int, int, int, int, int, int]) -> CoAtNetConfig:
    """CoAtNet-6/7 (Table 12): S3 is 8 MBConv blocks, then 42 Transformer blocks at a larger width."""
    s0, s1, s2, s3_conv, s3_tfm, s4 = channels
    stages = (StageConfig("mbconv", 2, s1), StageConfig("mbconv", 4, s2), StageConfig("mbconv", 8, s3_conv),
              StageConfig("transformer", 42, s3_tfm, stride=1), StageConfig("transformer", 2, s4))
    return CoAtNetConfig(name=name, stem_channels=s0, stages=stages, head_size=128, head_hidden_size=s4)


@register_model(_paper(1.47e9, f512=1521e9))
def coatnet_6(**kwargs) -> CoAtNet:
    """CoAtNet-6 (Table 12): S0 2/192, S1 2/192, S2 4/384, S3 8 MBConv/768 + 42 TFM/1536, S4 2/2048.

    Head size 128; 1.47B params reported.
    """
    return _build(_split_s3_config("coatnet_6", (192, 192, 384, 768, 1536, 2048)), **kwargs)


@register_model(_paper(2.44e9, f512=2586e9))
def coatnet_7(**kwargs) -> CoAtNet:
    """CoAtNet-7 (Table 12): S0 2/192, S1 2/256, S2 4/512, S3 8 MBConv/1024 + 42 TFM/2048, S4 2/3072.

    Head size 128; 2.44B params reported.
    """
    return _build(_split_s3_config("coatnet_7", (192, 256, 512, 1024, 2048, 3072)), **kwargs)


# The controlled study of Section 2.2 (Figure 1): five layouts "of similar parameter count and
# cost". Our size rule: the four multi-stage layouts keep CoAtNet-0's stem and widths (S0..S4 =
# 64, 96, 192, 384, 768) and depths (2, 2, 3, 5, 2), only the block type of S2..S4 changes; where
# S3 is MBConv it has 7 blocks instead of 5, because an MBConv block has about 0.7x the parameters
# of a Transformer block of the same width. VIT_REL is a 16x16 patch stem and 14 relative-attention
# blocks at width 384 (CoAtNet-0's S3 width, head size 32). All five land at 24-27M parameters.
# No stochastic depth: the study trains without regularisation.

_STUDY_WIDTHS = (64, 96, 192, 384, 768)


@register_model()
def vit_rel(**kwargs) -> CoAtNet:
    """VIT_REL (Section 2.2): ViT stem (16x16 patches), then 14 TFM_Rel blocks at width 384."""
    stages = (StageConfig("transformer", 14, 384, stride=1),)
    return _build(CoAtNetConfig(name="vit_rel", stem="patch", stem_stride=16, stem_channels=384, stages=stages,
                                head_hidden_size=384), **kwargs)


@register_model()
def c_c_c_c(**kwargs) -> CoAtNet:
    """C-C-C-C (Section 2.2): MBConv in S1..S4, depths 2, 3, 7, 2 at CoAtNet-0's widths."""
    return _build(_paper_config("c_c_c_c", (2, 2, 3, 7, 2), _STUDY_WIDTHS, layout="CCCC"), **kwargs)


@register_model()
def c_c_c_t(**kwargs) -> CoAtNet:
    """C-C-C-T (Section 2.2): MBConv in S1..S3, Transformer in S4, depths 2, 3, 7, 2."""
    return _build(_paper_config("c_c_c_t", (2, 2, 3, 7, 2), _STUDY_WIDTHS, layout="CCCT"), **kwargs)


@register_model()
def c_c_t_t(**kwargs) -> CoAtNet:
    """C-C-T-T (Section 2.2): CoAtNet-0's network, without stochastic depth."""
    return _build(_paper_config("c_c_t_t", (2, 2, 3, 5, 2), _STUDY_WIDTHS, layout="CCTT"), **kwargs)


@register_model()
def c_t_t_t(**kwargs) -> CoAtNet:
    """C-T-T-T (Section 2.2): MBConv in S1, Transformer in S2..S4, depths 2, 3, 5, 2."""
    return _build(_paper_config("c_t_t_t", (2, 2, 3, 5, 2), _STUDY_WIDTHS, layout="CTTT"), **kwargs)


# Small models for CPU work and small images: ours, not the paper's. The stem keeps full
# resolution (stride 1), so the network's stride is 16 and a 32x32 input still reaches S4 as a
# 2x2 grid instead of 1x1. Same blocks and C-C-T-T layout; no pre-logits layer.


def _small_config(name: str, depths: tuple[int, ...], channels: tuple[int, ...]) -> CoAtNetConfig:
    return CoAtNetConfig(name=name, stem_channels=channels[0], stages=_stages("CCTT", depths[1:], channels[1:]),
                         stem_stride=1, img_size=(32, 32))


@register_model()
def coatnet_pico(**kwargs) -> CoAtNet:
    """Ours, not the paper's: C-C-T-T, L=1,1,1,2,1, D=16,32,64,128,256, stride-1 stem, 32x32 input (1.4M)."""
    return _build(_small_config("coatnet_pico", (1, 1, 1, 2, 1), (16, 32, 64, 128, 256)), **kwargs)


@register_model()
def coatnet_nano(**kwargs) -> CoAtNet:
    """Ours, not the paper's: C-C-T-T, L=2,2,2,3,2, D=32,48,96,192,384, stride-1 stem, 32x32 input (5.3M)."""
    return _build(_small_config("coatnet_nano", (2, 2, 2, 3, 2), (32, 48, 96, 192, 384)), **kwargs)
