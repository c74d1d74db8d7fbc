"""CoAtNet: depthwise convolution and relative self-attention, stacked C-C-T-T.

Dai, Liu, Le, Tan. "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021
(arXiv:2106.04803). Equation, table and appendix numbers in the comments are the paper's.

The file reads top to bottom: configuration dataclasses, the building blocks (S0 stem, MBConv,
relative attention, Transformer block), the network, then the named configurations: CoAtNet-0..7
(Tables 3, 11, 12), the five layouts of the controlled study (Section 2.2), two small models
of ours for CPU work on small images, and timm's "rw" variants, for the ImageNet weights timm
publishes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import SqueezeExcitation, StochasticDepth

from .pretrained import save_pretrained
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
    # Where timm's "rw" variants (the coatnet_*_rw configurations below, whose ImageNet weights
    # timm publishes) depart from the paper. Every default is the paper's.
    stem_mid_channels: int | None = None  # width of the stem's first conv (default: stem_channels)
    stem_bias: bool = True  # bias on the stem's second conv
    activation: Literal["gelu", "silu"] = "gelu"  # in the stem and MBConv; the FFN keeps GELU
    # "input": MBConv's hidden width is expand_ratio x its input width (SE squeeze: se_ratio x the
    # hidden width) and attention runs at the input width, its output projection widening.
    expand_from: Literal["output", "input"] = "output"
    mbconv_pre_norm_act: bool = False  # activation after MBConv's pre-norm BatchNorm
    downsample_by_pool: bool = False  # MBConv strides by a 2x2 average pool before the expansion
    se_activation: Literal["gelu", "silu", "relu"] = "gelu"
    se_before_norm: bool = False  # SE on the depthwise conv's output, before its BatchNorm
    mbconv_output_bias: bool = True  # bias on MBConv's projection and shortcut 1x1 convs
    pool: Literal["max", "avg", "max3x3"] = "max"  # Pool of Eq. 4, 5: 2x2 max, 2x2 average, 3x3 max
    transformer_shortcut_bias: bool = True  # bias on the Proj of Eq. 4
    relative_position: Literal["table", "mlp"] = "table"  # "mlp": an MLP of the offset gives w_{i-j}
    relative_position_mlp_width: int = 512
    layer_scale_init: float | None = None  # learnt per-channel scale on Transformer branches
    transformer_norm: Literal["layernorm", "batchnorm"] = "layernorm"  # in Transformer blocks, head
    norm_eps: float = 1e-5  # of the Transformer blocks' and the head's norms
    head_norm_before_pool: bool = False  # normalise the last feature map, then pool

    def __post_init__(self) -> None:
        img = self.img_size
        img = (img, img) if isinstance(img, int) else tuple(img)
        object.__setattr__(self, "img_size", img)
        object.__setattr__(self, "stages", tuple(StageConfig(**s) if isinstance(s, dict) else s for s in self.stages))
        choices = {"stem": ("conv", "patch"), "activation": ("gelu", "silu"), "expand_from": ("output", "input"),
                   "se_activation": ("gelu", "silu", "relu"), "pool": ("max", "avg", "max3x3"),
                   "relative_position": ("table", "mlp"), "transformer_norm": ("layernorm", "batchnorm")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.downsample_on_depthwise and self.downsample_by_pool:
            raise ValueError("downsample_on_depthwise and downsample_by_pool exclude each other: MBConv strides once")
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
        norm = "LayerNorm" if self.transformer_norm == "layernorm" else "BatchNorm"
        pool_norm = f"{norm} + avg-pool" if self.head_norm_before_pool else f"avg-pool + {norm}"
        rows.append(f"  head  {pool_norm} + {head}linear {self.num_classes}")
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


# Fast paths. At inference (autograd off, eager PyTorch) some modules take shortcuts that compute
# the same function with fewer passes over memory: BatchNorm folded into the conv before it, the
# activation fused into that conv, squeeze-excitation scaling in place, and on CPU a batch too wide
# for the heap run through MBConv in chunks. With autograd on (training, or gradients of an
# eval-mode model) and under tracing, torch.compile or torch.export, they run their plain layers.
# tests/test_fast_paths.py checks that both agree to 1e-5.


# The largest block glibc's malloc serves from its heap (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit);
# larger ones are fresh mmaps, page-faulted in on every use (MBConv.inference_chunk).
MAX_HEAP_BLOCK = 32 * 2**20


def eager_inference() -> bool:
    """Autograd off, in plain eager execution: where the inference fast paths may run."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling())


def tensor_versions(*tensors: Tensor) -> tuple:
    """The key of a cache derived from ``tensors``: it changes when one of them is updated in place
    (optimizer step, ``load_state_dict``: ``_version``) or moved (``.to()``: ``data_ptr``)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one conv that computes ``norm(conv(x))`` with the norm's running statistics.

    With fixed statistics BatchNorm is a per-channel affine map, ``x * scale + shift``, so it folds
    into the conv's weight and bias: the same function, up to float rounding.
    """
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), shift


# oneDNN's post-op for each activation; algorithm "none" is the exact (erf) GELU, the paper's.
_ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "silu": ("swish", ""), "relu": ("relu", "")}
_ONEDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> activation (GELU in the paper), the post-activation unit inside the stem and MBConv.

    Layers and state dict as torchvision's ``Conv2dNormActivation``: ``0`` the conv (no bias), ``1``
    the norm, ``2`` the activation. At eager inference in eval mode the norm is folded into the conv
    (the folded weights are kept until a parameter or statistic changes), and on CPU the activation
    runs as a post-op of the same oneDNN convolution, the kernel PyTorch's own compiler emits for
    this pattern: the output is written once instead of three times. That matters most for the
    widest tensor, MBConv's hidden one in S1 (38 MB at batch 8 and 224x224).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 activation: str = "gelu"):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), ACTIVATIONS[activation]())
        self.activation = activation
        self._folded: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not eager_inference():
            return super().forward(x)
        conv, norm, act = self
        key = tensor_versions(conv.weight, *norm.parameters(), *norm.buffers())
        if self._folded is None or self._folded[0] != key:
            self._folded = key, fold_batch_norm(conv, norm)
        weight, bias = self._folded[1]
        if _ONEDNN_CONV and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
            post_op, algorithm = _ONEDNN_POST_OPS[self.activation]
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, conv.padding, conv.stride, conv.dilation,
                                                           conv.groups, post_op, [], algorithm)
        return act(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


class SqueezeExcite(SqueezeExcitation):
    """torchvision's squeeze-excitation, ``x * sigmoid(fc2(act(fc1(mean(x)))))``, scaling ``x`` in
    place at eager inference: in MBConv its input is a fresh intermediate, the block's widest
    tensor, so the copy is saved."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self._scale(x)) if eager_inference() else super().forward(x)


def conv_stem(in_chans: int, channels: int, stride: int, mid_channels: int | None = None,
              activation: str = "gelu", bias: bool = True) -> nn.Sequential:
    """S0: a 2-layer convolutional stem, 3x3 with ``stride`` then 3x3 (Section 2.2).

    Its output enters the residual stream un-normalized: every block after it is pre-norm.
    timm's rw variants make the first conv narrower (``mid_channels``) and drop the last bias.
    """
    mid_channels = mid_channels or channels
    return nn.Sequential(
        ConvBNAct(in_chans, mid_channels, 3, stride=stride, activation=activation),
        nn.Conv2d(mid_channels, channels, 3, padding=1, bias=bias),
    )


def pool_2d(pool: str) -> nn.Module:
    """The Pool of Eq. 4 and 5, stride 2: "max" 2x2 (the paper), "avg" 2x2 or "max3x3" (timm's rw variants)."""
    if pool == "max3x3":
        return nn.MaxPool2d(3, 2, padding=1)
    return nn.MaxPool2d(2, 2) if pool == "max" else nn.AvgPool2d(2, 2)


class MBConv(nn.Module):
    """Pre-activation MBConv with squeeze-excitation: ``x + Module(BatchNorm(x))``.

    Module = 1x1 conv (expand x4) -> depthwise 3x3 -> SE (0.25) -> 1x1 conv, BatchNorm and GELU
    between. The expansion is taken from the output width, as in the inverted bottleneck of the FFN.
    With ``stride=2`` (Eq. 5): ``x <- Proj(Pool(x)) + Conv(DepthConv(Conv(Norm(x), stride=2)))``,
    the stride on the first 1x1 conv; ``stride_on_depthwise`` moves it to the depthwise conv
    (the Table 9 variant).

    The keyword-only options reproduce timm's rw variants (see :class:`CoAtNetConfig`): another
    ``activation``, an activated pre-norm, the expansion taken from the input width, the stride
    taken by a 2x2 average pool before the expansion, SE before the depthwise BatchNorm, no bias
    on the 1x1 output convs, another ``pool`` on the shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expand_ratio: int = 4,
                 se_ratio: float = 0.25, stride_on_depthwise: bool = False, drop_path: float = 0.0, *,
                 activation: str = "gelu", pre_norm_act: bool = False, expand_from_input: bool = False,
                 stride_by_pool: bool = False, se_activation: str = "gelu", se_before_norm: bool = False,
                 output_bias: bool = True, pool: str = "max"):
        super().__init__()
        hidden = (in_channels if expand_from_input else out_channels) * expand_ratio
        squeeze = max(1, int((hidden if expand_from_input else out_channels) * se_ratio))
        self.shortcut = _shortcut_2d(in_channels, out_channels, stride, pool, output_bias)
        expand_stride = 1 if stride_by_pool or stride_on_depthwise else stride
        depthwise_stride = stride if stride_on_depthwise else 1
        layers = [("norm", nn.BatchNorm2d(in_channels))]
        if pre_norm_act:
            layers.append(("act", ACTIVATIONS[activation]()))
        if stride > 1 and stride_by_pool:  # timm averages here, whichever pool its shortcut uses
            layers.append(("pool", nn.AvgPool2d(stride)))
        layers.append(("expand", ConvBNAct(in_channels, hidden, 1, stride=expand_stride, activation=activation)))
        se = SqueezeExcite(hidden, squeeze, activation=ACTIVATIONS[se_activation])
        if se_before_norm:
            depthwise = nn.Conv2d(hidden, hidden, 3, depthwise_stride, padding=1, groups=hidden, bias=False)
            layers += [("depthwise", depthwise), ("se", se),
                       ("depthwise_norm", nn.Sequential(nn.BatchNorm2d(hidden), ACTIVATIONS[activation]()))]
        else:
            layers += [("depthwise", ConvBNAct(hidden, hidden, 3, depthwise_stride, hidden, activation)), ("se", se)]
        layers.append(("project", nn.Conv2d(hidden, out_channels, 1, bias=output_bias)))
        self.residual = nn.Sequential(OrderedDict(layers))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        chunk = self.inference_chunk(x)
        if chunk is not None:
            return torch.cat([self._forward(part) for part in x.split(chunk)])
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.drop_path(self.residual(x))

    def inference_chunk(self, x: Tensor) -> int | None:
        """Images per chunk at eager CPU inference, where each image is computed on its own
        (BatchNorm uses its running statistics): as many as keep the block's hidden tensor, its
        widest, within ``MAX_HEAP_BLOCK``; None, no chunks, when the whole batch fits or elsewhere
        (training, autograd, GPU, tracing and compiling, where the batch size may be symbolic).

        CoAtNet-0's S1 at batch 8 and 224x224 would have a 38 MB hidden tensor, four of them a
        pass: in halves, the same memory is reused from the heap instead of page-faulted in anew,
        and inference is 10% faster on 2 CPU cores (30% at batch 32)."""
        if self.training or x.device.type != "cpu" or not eager_inference():
            return None
        expand = self.residual.expand[0]
        height, width = x.shape[-2] // expand.stride[0], x.shape[-1] // expand.stride[1]
        per_image = expand.out_channels * height * width * x.element_size()
        chunks = -(-len(x) * per_image // MAX_HEAP_BLOCK)  # ceil: as few chunks as will fit, evened out
        return -(-len(x) // chunks) if chunks > 1 else None


def _shortcut_2d(in_channels: int, out_channels: int, stride: int, pool: str = "max", bias: bool = True) -> nn.Module:
    """The identity branch: Proj(Pool(x)) when the block down-samples or changes width (A.1)."""
    layers = []
    if stride > 1:
        layers.append(pool_2d(pool))
    if in_channels != out_channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 1, bias=bias))
    return nn.Sequential(*layers) if layers else nn.Identity()


def max_pool_tokens(x: Tensor, height: int, width: int) -> Tensor:
    """2x2 max-pool, stride 2, of a (B, H*W, C) token sequence laid out row by row.

    The tokens are an NCHW map in channels-last memory, without a copy; its pooling kernel is ~10x
    faster than a max over a 6-D view of the tokens.
    """
    b, _, c = x.shape
    return F.max_pool2d(x.transpose(1, 2).reshape(b, c, height, width), 2).flatten(2).transpose(1, 2)


def pool_tokens(x: Tensor, height: int, width: int, pool: str = "max") -> Tensor:
    """:func:`pool_2d`'s Pool, stride 2, on a (B, H*W, C) token sequence laid out row by row."""
    if pool == "max":
        return max_pool_tokens(x, height, width)
    b, _, c = x.shape
    if pool == "avg":
        return x.reshape(b, height // 2, 2, width // 2, 2, c).mean(dim=(2, 4)).reshape(b, -1, c)
    grid = x.transpose(1, 2).reshape(b, c, height, width)
    return F.max_pool2d(grid, 3, 2, padding=1).flatten(2).transpose(1, 2)


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


def log_relative_offsets(height: int, width: int, device: torch.device) -> Tensor:
    """(2H-1, 2W-1, 2): every offset (dr, dc) of an H x W grid, log-spaced as sign(d) log(1 + |d|)."""
    dr = torch.arange(-(height - 1), height, device=device, dtype=torch.float32)
    dc = torch.arange(-(width - 1), width, device=device, dtype=torch.float32)
    offsets = torch.stack(torch.meshgrid(dr, dc, indexing="ij"), dim=-1)
    return offsets.sign() * offsets.abs().log1p()


class RelativeAttention(nn.Module):
    """Multi-head self-attention with a pre-softmax relative position bias (Eq. 3).

    ``y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w_{i-j}) v_j``: w is an input-independent scalar
    per relative offset and head, held in a trainable (2H-1)x(2W-1) table per head; the bias
    between positions (r, c) and (r', c') is ``P[r-r'+H-1, c-c'+W-1]``. Not shared across layers.
    For a grid other than ``grid_size`` the table is bilinearly interpolated, and a state dict
    saved at another size is interpolated on load. Without autograd (inference), the gathered
    (heads, N, N) bias is cached per grid size and rebuilt only when the table changes.

    Two departures serve timm's rw variants. ``relative_position="mlp"`` (the rmlp variants, after
    Swin-V2) computes the table instead of storing it: a 2-layer ReLU MLP maps each log-spaced
    offset to one w per head, so any grid gets its bias without interpolation. ``attention_dim``
    (default ``out_dim``) is the width of q, k and v; the rw variants attend at ``in_dim`` and
    widen in the output projection.
    """

    def __init__(self, in_dim: int, out_dim: int, head_size: int, grid_size: tuple[int, int],
                 attention_dim: int | None = None, relative_position: str = "table", mlp_width: int = 512):
        super().__init__()
        attention_dim = attention_dim or out_dim
        self.num_heads = attention_dim // head_size
        self.head_size = head_size
        self.qkv = nn.Linear(in_dim, 3 * attention_dim)
        self.proj = nn.Linear(attention_dim, out_dim)
        self.relative_position = relative_position
        if relative_position == "mlp":
            # Dropout on the hidden layer, as timm trains it.
            self.relative_position_mlp = nn.Sequential(OrderedDict(
                fc1=nn.Linear(2, mlp_width), act=nn.ReLU(), drop=nn.Dropout(0.125),
                fc2=nn.Linear(mlp_width, self.num_heads)))
        else:
            height, width = grid_size
            self.relative_position_table = nn.Parameter(torch.zeros(self.num_heads, 2 * height - 1, 2 * width - 1))
        self._bias_cache: dict[tuple, Tensor] = {}

    def relative_table(self, height: int, width: int) -> Tensor:
        """The (heads, 2H-1, 2W-1) table of w for an H x W grid: resized, or computed by the MLP."""
        if self.relative_position == "mlp":
            weight = self.relative_position_mlp.fc1.weight
            offsets = log_relative_offsets(height, width, weight.device).to(weight.dtype)
            return self.relative_position_mlp(offsets).permute(2, 0, 1)
        return resize_relative_table(self.relative_position_table, (2 * height - 1, 2 * width - 1))

    def relative_position_bias(self, height: int, width: int) -> Tensor:
        """The (heads, H*W, H*W) bias for an H x W grid, gathered from the table."""
        table = self.relative_table(height, width)
        # The compiler folds the index into the graph; it would trace through the cache, and warn.
        index = relative_position_index.__wrapped__ if torch.compiler.is_compiling() else relative_position_index
        return table.flatten(1)[:, index(height, width, table.device)]

    def _position_parameters(self) -> list[Tensor]:
        if self.relative_position == "mlp":
            return list(self.relative_position_mlp.parameters())
        return [self.relative_position_table]

    def _bias(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        # In training mode the MLP's dropout makes every bias different: nothing to cache.
        if not eager_inference() or (self.training and self.relative_position == "mlp"):
            return self.relative_position_bias(height, width).to(dtype)
        params = self._position_parameters()
        key = (height, width, dtype, params[0].device, *tensor_versions(*params))  # never a stale bias
        bias = self._bias_cache.get(key)
        if bias is None:
            self._bias_cache = {k: v for k, v in self._bias_cache.items() if k[:2] != (height, width)}
            bias = self._bias_cache[key] = self.relative_position_bias(height, width).to(dtype)
        return bias

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        # A 4-D mask (1, heads, N, N): with a 3-D one the CPU falls back from its fused kernel to the math path.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(height, width, q.dtype).unsqueeze(0))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "relative_position_table"
        table = state_dict.get(key)
        if table is not None and self.relative_position == "table":
            mine = self.relative_position_table
            if table.dim() == 3 and table.shape[0] == mine.shape[0] and table.shape != mine.shape:
                state_dict[key] = resize_relative_table(table, tuple(mine.shape[1:]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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

    The keyword-only options reproduce timm's rw variants (see :class:`CoAtNetConfig`): another
    ``pool``, attention at the input width, no bias on Proj, the MLP relative position bias, a
    :class:`LayerScale` on both branches, and BatchNorm or another eps for the norms.
    """

    def __init__(self, in_dim: int, out_dim: int, head_size: int, grid_size: tuple[int, int],
                 downsample: bool = False, expand_ratio: int = 4, drop_path: float = 0.0, *, pool: str = "max",
                 attend_at_input_width: bool = False, shortcut_bias: bool = True, relative_position: str = "table",
                 relative_position_mlp_width: int = 512, layer_scale_init: float | None = None,
                 norm: str = "layernorm", norm_eps: float = 1e-5):
        super().__init__()
        self.downsample = downsample
        self.pool = pool
        self.shortcut = nn.Linear(in_dim, out_dim, bias=shortcut_bias) if in_dim != out_dim else nn.Identity()
        self.attn_norm = token_norm(norm, in_dim, norm_eps)
        attention_dim = in_dim if attend_at_input_width else out_dim
        self.attn = RelativeAttention(in_dim, out_dim, head_size, grid_size, attention_dim, relative_position,
                                      relative_position_mlp_width)
        self.attn_scale = LayerScale(out_dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.ffn_norm = token_norm(norm, out_dim, norm_eps)
        self.ffn = nn.Sequential(nn.Linear(out_dim, expand_ratio * out_dim), nn.GELU(),
                                 nn.Linear(expand_ratio * out_dim, out_dim))
        self.ffn_scale = LayerScale(out_dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``height`` x ``width`` is the input grid; the output grid is half of it when down-sampling."""
        y = self.attn_norm(x)
        if self.downsample:
            x, y = pool_tokens(x, height, width, self.pool), pool_tokens(y, height, width, self.pool)
            height, width = height // 2, width // 2
        x = self.shortcut(x) + self.drop_path(self.attn_scale(self.attn(y, height, width)))
        return x + self.drop_path(self.ffn_scale(self.ffn(self.ffn_norm(x))))


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
    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _keeping_buffers(block)))


class ConvStage(nn.Sequential):
    """A stage of MBConv blocks, NCHW in and out."""

    def __init__(self, blocks: list[MBConv]):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            x = run_block(block, self.grad_checkpointing, x)
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


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class CoAtNet(nn.Module):
    """CoAtNet and the layouts of the paper's controlled study, from a :class:`CoAtNetConfig`.

    S0 stem, stages S1..S4 (MBConv or Transformer), then global average pooling, LayerNorm, an
    optional pre-logits layer and a linear classifier (no class token); timm's rw variants apply
    the norm before the pooling. timm's interface:
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
            self.stem = conv_stem(c.in_chans, c.stem_channels, c.stem_stride, c.stem_mid_channels, c.activation,
                                  c.stem_bias)

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
                    blocks.append(MBConv(
                        block_in, s.channels, stride, c.expand_ratio, c.se_ratio, c.downsample_on_depthwise, drop,
                        activation=c.activation, pre_norm_act=c.mbconv_pre_norm_act,
                        expand_from_input=c.expand_from == "input", stride_by_pool=c.downsample_by_pool,
                        se_activation=c.se_activation, se_before_norm=c.se_before_norm,
                        output_bias=c.mbconv_output_bias, pool=c.pool))
                else:
                    blocks.append(TransformerBlock(
                        block_in, s.channels, c.head_size, grid, stride == 2, c.expand_ratio, drop, pool=c.pool,
                        attend_at_input_width=c.expand_from == "input", shortcut_bias=c.transformer_shortcut_bias,
                        relative_position=c.relative_position,
                        relative_position_mlp_width=c.relative_position_mlp_width,
                        layer_scale_init=c.layer_scale_init, norm=c.transformer_norm, norm_eps=c.norm_eps))
            stages.append(ConvStage(blocks) if s.block == "mbconv" else TransformerStage(blocks, s.stride))
            in_ch, reduction = s.channels, reduction * s.stride
            self.feature_info.append(dict(num_chs=in_ch, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)

        self.num_features = c.num_features
        self.head_hidden_size = c.head_hidden_size or c.num_features
        self.head_norm = token_norm(c.transformer_norm, self.num_features, c.norm_eps)
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

    def forward_stem(self, x: Tensor) -> Tensor:
        """Check the batch and run S0, channels-last from here on: NCHW shape, NHWC memory.

        On CPU the convolutions are several times faster so, and the Transformer stages read the
        maps as token sequences without a copy. The values are the same; the maps returned by
        ``forward_features`` and ``forward_intermediates`` keep that memory format.
        """
        self.check_input(x)
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.config.head_norm_before_pool:
            x = self.head_norm(x.permute(0, 2, 3, 1)).mean(dim=(1, 2))
        else:
            x = self.head_norm(x.mean(dim=(2, 3)))
        x = self.pre_logits(x)
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's
        name): training memory falls to about the blocks' inputs plus one block's activations, for
        one more forward pass of compute. Off by default."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def default_feature_indices(self) -> list[int]:
        """Indices into ``feature_info`` of the last stage at each resolution (S1..S4)."""
        info = self.feature_info
        return [i for i in range(1, len(info))
                if i == len(info) - 1 or info[i + 1]["reduction"] != info[i]["reduction"]]

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
        x = self.forward_stem(x)
        maps = [x] if 0 in indices else []
        last = max(indices) if intermediates_only else len(self.stages)
        for i, stage in enumerate(self.stages[:last], 1):
            x = stage(x)
            if i in indices:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``; ``coatnet.from_pretrained`` reads it."""
        return save_pretrained(self, directory)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, RelativeAttention) and m.relative_position == "table":
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


# timm's "rw" variants: not the paper's configurations but Ross Wightman's, trained for timm before
# the paper's code was public; timm publishes ImageNet weights for most of them, which
# `coatnet convert-timm` turns into ours. Same C-C-T-T layout and blocks, with these departures
# (CoAtNetConfig's switches): S1..S4 only (no stem stage depth), a narrower first stem conv, SiLU
# in the stem and MBConv, widths expanded from a block's input, 2x2 average pooling, norms with
# eps 1e-6 and the head's applied before the pooling, no pre-logits layer, no stochastic depth
# by default; per variant: where MBConv strides, the SE's place and activation, biases, BatchNorm,
# layer scale and the MLP relative position bias. Named as in timm, less the resolution suffix.

_RW_NANO, _RW_0, _RW_2, _RW_3 = (64, 128, 256, 512), (96, 192, 384, 768), (128, 256, 512, 1024), (192, 384, 768, 1536)
# The two smallest follow timm's MaxViT-style defaults: plain pre-norm, biased MBConv outputs, SiLU in SE.
_RW_MAX_STYLE = dict(mbconv_pre_norm_act=False, mbconv_output_bias=True, se_activation="silu")


def _timm_rw_config(name: str, depths: tuple[int, ...], channels: tuple[int, ...], stem: tuple[int, int] = (32, 64),
                    downsample: Literal["pool", "depthwise"] = "depthwise", **switches) -> CoAtNetConfig:
    """A timm rw CoAtNet: S1..S4 depths and widths, the stem's two widths, where MBConv strides, and
    the variant's own switches over the common ones (timm's ``_rw_coat_cfg``)."""
    common = dict(stem_mid_channels=stem[0], stem_bias=False, activation="silu", expand_from="input",
                  mbconv_pre_norm_act=True, downsample_by_pool=downsample == "pool",
                  downsample_on_depthwise=downsample == "depthwise", se_activation="relu", mbconv_output_bias=False,
                  pool="avg", norm_eps=1e-6, head_norm_before_pool=True)
    return CoAtNetConfig(name=name, stem_channels=stem[1], stages=_stages("CCTT", depths, channels),
                         **(common | switches))


@register_model()
def coatnet_nano_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_nano_rw_224, not the paper's: L=3,4,6,3, D=64..512; MBConv strides by pooling."""
    return _build(_timm_rw_config("coatnet_nano_rw", (3, 4, 6, 3), _RW_NANO, downsample="pool", **_RW_MAX_STYLE),
                  **kwargs)


@register_model()
def coatnet_0_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_0_rw_224, not the paper's CoAtNet-0: L=2,3,7,2 (deeper S3), D=96..768; MBConv
    strides by pooling, SE before the depthwise BatchNorm; no bias on the Transformer shortcut."""
    return _build(_timm_rw_config("coatnet_0_rw", (2, 3, 7, 2), _RW_0, downsample="pool", se_before_norm=True,
                                  transformer_shortcut_bias=False), **kwargs)


@register_model()
def coatnet_1_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_1_rw_224, not the paper's CoAtNet-1: L=2,6,14,2, D=96..768; SE before the
    depthwise BatchNorm; no bias on the Transformer shortcut."""
    return _build(_timm_rw_config("coatnet_1_rw", (2, 6, 14, 2), _RW_0, se_before_norm=True,
                                  transformer_shortcut_bias=False), **kwargs)


@register_model()
def coatnet_2_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_2_rw_224, not the paper's CoAtNet-2: L=2,6,14,2, D=128..1024, stem 64/128; SiLU in SE."""
    return _build(_timm_rw_config("coatnet_2_rw", (2, 6, 14, 2), _RW_2, stem=(64, 128), se_activation="silu"),
                  **kwargs)


@register_model()
def coatnet_3_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_3_rw_224, not the paper's CoAtNet-3: L=2,6,14,2, D=192..1536, stem 96/192; SiLU
    in SE, layer scale 1e-6 on the Transformer branches."""
    return _build(_timm_rw_config("coatnet_3_rw", (2, 6, 14, 2), _RW_3, stem=(96, 192), se_activation="silu",
                                  layer_scale_init=1e-6), **kwargs)


@register_model()
def coatnet_bn_0_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_bn_0_rw_224: coatnet_0_rw's network, strided on the depthwise conv, with
    BatchNorm instead of LayerNorm in the Transformer blocks and the head."""
    return _build(_timm_rw_config("coatnet_bn_0_rw", (2, 3, 7, 2), _RW_0, se_before_norm=True,
                                  transformer_shortcut_bias=False, transformer_norm="batchnorm"), **kwargs)


@register_model()
def coatnet_rmlp_nano_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_nano_rw_224: L=3,4,6,3, D=64..512, MLP relative position bias (width 384)."""
    return _build(_timm_rw_config("coatnet_rmlp_nano_rw", (3, 4, 6, 3), _RW_NANO, relative_position="mlp",
                                  relative_position_mlp_width=384, **_RW_MAX_STYLE), **kwargs)


@register_model()
def coatnet_rmlp_0_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_0_rw_224 (no published weights): coatnet_0_rw's depths, MLP relative position bias."""
    return _build(_timm_rw_config("coatnet_rmlp_0_rw", (2, 3, 7, 2), _RW_0, relative_position="mlp"), **kwargs)


@register_model()
def coatnet_rmlp_1_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_1_rw_224: L=2,6,14,2, D=96..768; MBConv strides by pooling, 3x3 max Pool on
    the shortcuts and in attention, SE before the depthwise BatchNorm, MLP relative position bias (384)."""
    return _build(_timm_rw_config("coatnet_rmlp_1_rw", (2, 6, 14, 2), _RW_0, downsample="pool", pool="max3x3",
                                  se_before_norm=True, transformer_shortcut_bias=False, relative_position="mlp",
                                  relative_position_mlp_width=384), **kwargs)


@register_model()
def coatnet_rmlp_1_rw2(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_1_rw2_224: L=2,6,14,2, D=96..768, MLP relative position bias."""
    return _build(_timm_rw_config("coatnet_rmlp_1_rw2", (2, 6, 14, 2), _RW_0, relative_position="mlp"), **kwargs)


@register_model()
def coatnet_rmlp_2_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_2_rw_224 (and _384 at img_size=384): coatnet_2_rw with layer scale 1e-6
    and the MLP relative position bias."""
    return _build(_timm_rw_config("coatnet_rmlp_2_rw", (2, 6, 14, 2), _RW_2, stem=(64, 128), se_activation="silu",
                                  layer_scale_init=1e-6, relative_position="mlp"), **kwargs)


@register_model()
def coatnet_rmlp_3_rw(**kwargs) -> CoAtNet:
    """timm's coatnet_rmlp_3_rw_224 (no published weights): coatnet_3_rw with the MLP relative position bias."""
    return _build(_timm_rw_config("coatnet_rmlp_3_rw", (2, 6, 14, 2), _RW_3, stem=(96, 192), se_activation="silu",
                                  layer_scale_init=1e-6, relative_position="mlp"), **kwargs)
