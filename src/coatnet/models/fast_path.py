"""The inference fast path: the same function as the paper's blocks, with fewer passes over memory.

Everything that makes eager inference fast lives here, so that the blocks in ``coatnet.py`` read
as the paper. It runs only where the result cannot differ: the model in eval mode, autograd off
(``torch.inference_mode()`` or ``torch.no_grad()``), plain eager execution (not tracing, compiling
or exporting, where the plain layers run and the compiler fuses them itself):

- :class:`ConvBNAct`: BatchNorm folded into the conv before it, and on CPU the activation fused
  into the same oneDNN convolution as a post-op, the kernel PyTorch's own compiler emits for this
  pattern: the output is written once instead of three times.
- :class:`SqueezeExcite`: the scaling done in place on its input, a fresh intermediate.
- :func:`inference_chunk`: on CPU, an MBConv block whose hidden tensor would be too large for
  glibc's heap runs the batch in even chunks (``MAX_HEAP_BLOCK``).

Nothing is cached: the folded weights are computed on every call (cheap next to the conv
itself; README, Performance), so the fast path is right after any change of the
weights (optimizer steps, fused or not, ``load_state_dict``, ``.to()``), for models built under
``inference_mode``, and from several threads at once. ``tests/test_fast_paths.py`` checks it
against the plain path.

One step goes further, explicitly, for serving: :func:`compile_for_inference` returns a frozen,
compiled snapshot, where the weights are constants of the program.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchvision.ops import SqueezeExcitation

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}

# The largest block glibc's malloc serves from its heap (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit).
# Larger ones are fresh mmaps, page-faulted in on every use.
MAX_HEAP_BLOCK = 32 * 2**20

# oneDNN's post-op for each activation; algorithm "none" is the exact (erf) GELU, the paper's.
_ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "silu": ("swish", ""), "relu": ("relu", "")}
_ONEDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def eager_inference() -> bool:
    """Autograd off, in plain eager execution: where the fast path may run."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling())


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


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> activation (GELU in the paper), the post-activation unit of the stem and MBConv.

    Layers and state dict as torchvision's ``Conv2dNormActivation``: ``0`` the conv (no bias), ``1``
    the norm, ``2`` the activation. At eager inference, one folded (and on CPU fused) convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 activation: str = "gelu"):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), ACTIVATIONS[activation]())
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, act = self
        # Sharded weights (FSDP, the norm its own unit) are gathered only by the norm's own forward.
        if self.training or not eager_inference() or isinstance(norm.weight, DTensor):
            return super().forward(x)
        weight, bias = fold_batch_norm(conv, norm)
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


def inference_chunk(block: nn.Module, x: Tensor) -> int | None:
    """Images per chunk for an MBConv ``block`` at eager CPU inference, where each image is computed
    on its own (BatchNorm uses its running statistics): as many as keep the block's hidden tensor,
    its widest, within ``MAX_HEAP_BLOCK``. None, no chunks, when the whole batch fits, and in
    training, under autograd, on GPU, tracing and compiling (where the batch size may be symbolic).

    CoAtNet-0's S1 at batch 8 and 224x224 would make four 38 MB hidden tensors a pass; in halves,
    the same memory is reused from the heap instead of page-faulted in anew.
    """
    if block.training or x.device.type != "cpu" or not eager_inference():
        return None
    expand = block.residual.expand[0]
    height, width = x.shape[-2] // expand.stride[0], x.shape[-1] // expand.stride[1]
    per_image = expand.out_channels * height * width * x.element_size()
    chunks = -(-len(x) * per_image // MAX_HEAP_BLOCK)  # ceil: as few chunks as will fit, evened out
    return -(-len(x) // chunks) if chunks > 1 else None


def compile_for_inference(model: nn.Module) -> Callable[..., Tensor]:
    """A compiled snapshot of ``model`` for serving: ``torch.compile`` with Inductor's freezing, where
    the weights are constants of the program, so BatchNorm folds into the convolutions and the
    weights are prepacked once for oneDNN (on CPUs with AMX, bfloat16 matmuls and convs at the matrix
    units' speed). Call it under ``torch.inference_mode()`` or ``torch.no_grad()``, with the dtype
    it will serve (a bfloat16 model, or autocast); the first call compiles.

    A snapshot, like an export: later changes to ``model``'s weights are not seen by it; compile
    again after them. ``model`` is put in eval mode. README, Performance, has the figures.
    """
    compiled = torch.compile(model.eval())

    def serve(*args, **kwargs):
        # Inductor reads the flag while it compiles, at the first call (and at a recompile for a new
        # input shape), outside the scope of torch.compile's own options: set it around every call.
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return serve
