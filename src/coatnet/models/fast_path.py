"""The fast path: the same function as the paper's blocks, with fewer passes over memory.

Everything that makes eager execution fast lives here, so that the blocks in ``coatnet.py`` read
as the paper. The inference paths compute a module without calling its submodules, so they run
only where the result cannot differ (:func:`fusable`): autograd off (``torch.inference_mode()`` or
``torch.no_grad()``) in plain eager execution (not tracing, compiling or exporting, where the
compiler fuses the plain layers itself; no forward-mode AD, ``torch.func`` transform or dispatch
mode such as ``FlopCounterMode``, which must see the plain ops), the module and all its submodules
in eval mode and without forward hooks or a ``forward`` set on the instance, and each layer it reads
of the kind it expects (:func:`exactly`); in float32, and in bfloat16 (a converted model, or
autocast) where the CPU has it natively:

- :class:`ConvBNAct` (CPU): BatchNorm folded into the conv before it, and the activation fused
  into the same oneDNN convolution as a post-op, the kernel PyTorch's own compiler emits for this
  pattern: the output is written once instead of three times. (ReLU instead in place after it:
  oneDNN's turns NaN into 0.)
- :class:`FeedForward`: the Transformer FFN's GELU fused into its first linear layer the same way.
- :func:`mbconv_inference`: the squeeze-excitation's scaling in place on the block's hidden tensor,
  a fresh intermediate; on CPU, a block whose hidden tensor would be too large for glibc's heap
  runs the batch in even chunks (``MAX_HEAP_BLOCK``), and in bfloat16 the SE scaling and the
  residual add are folded into the projection (:func:`scaled_projection`).

Two paths serve training as well, the same function with fewer passes: the squeeze-excitation's
mean (:class:`SpatialMean`), and on the CPU the attention of Eq. 3 as written where PyTorch's fused
kernel does not run (:func:`attention`).

Nothing is cached: the folded weights are computed on every call (cheap next to the conv
itself; docs/performance.md), so the fast path is right after any change of the
weights (optimizer steps, fused or not, ``load_state_dict``, ``.to()``), for models built under
``inference_mode``, and from several threads at once. Sharded models (FSDP) take the plain layers:
``fully_shard`` gathers the weights in forward hooks. ``tests/test_fast_paths.py`` checks it
against the plain path.

One step goes further, explicitly, for serving: :func:`compile_for_inference` returns a frozen,
compiled snapshot, where the weights are constants of the program.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules import module as nn_module
from torchvision.ops import SqueezeExcitation, StochasticDepth

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}

# The largest block glibc's malloc serves from its heap (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit).
# Larger ones are fresh mmaps, page-faulted in on every use.
MAX_HEAP_BLOCK = 32 * 2**20

# oneDNN's post-op for each activation; algorithm "none" is the exact (erf) GELU, the paper's. Not
# ReLU: oneDNN's is max(x, 0), which turns NaN into 0 where torch.relu keeps it, so that a NaN from a
# corrupt image or checkpoint would give plausible logits instead of NaN ones. ReLU runs after the
# conv, in place on its fresh output.
_ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "silu": ("swish", "")}
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
# The dtypes oneDNN's fused kernels take here: bfloat16 where the CPU has it natively (AVX512-BF16, AMX).
_ONEDNN_DTYPES = {torch.float32} | ({torch.bfloat16} if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())


def compiling() -> bool:
    """Tracing, compiling or exporting: the compiler sees the plain layers and fuses them itself."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def transformed() -> bool:
    """Forward-mode AD or a ``torch.func`` transform (grad, jvp, vmap) is on: its tangents and batch
    dimensions go only through the plain ops (oneDNN's fused kernels and PyTorch's fused CPU attention
    would drop them or refuse)."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def watched() -> bool:
    """A dispatch mode looks at the ops (``FlopCounterMode``): it must see the ones it knows, the
    plain layers' (it counts no FLOPs for a fused oneDNN kernel or PyTorch's fused CPU attention)."""
    return torch._C._len_torch_dispatch_stack() > 0


def eager_execution() -> bool:
    """Plain eager execution, where the fast paths may run: not :func:`compiling`, :func:`transformed`
    or :func:`watched`."""
    return not (compiling() or transformed() or watched())  # compiling() first: the compiler traces no further


def hooked(module: nn.Module) -> bool:
    """Something must see ``module``'s call: forward hooks on it or registered globally (feature
    extraction; pruning and the older weight norm recompute the weight in a hook; FSDP gathers it in
    one), or a ``forward`` of its own set on the instance (accelerate's hooks, which move offloaded
    weights in before calling the class's)."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or module._forward_hooks
                or module._forward_pre_hooks or "forward" in vars(module))


def fusable(module: nn.Module) -> bool:
    """Whether the inference fast path may compute ``module`` without calling its submodules.

    At inference (autograd off) in :func:`eager_execution`, with ``module`` and every submodule in
    eval mode (a BatchNorm left in train mode, as test-time adaptation does, normalizes by its batch
    and updates its statistics) and none of them :func:`hooked`.
    """
    if torch.is_grad_enabled() or not eager_execution():
        return False
    return not any(m.training or hooked(m) for m in module.modules())


def exactly(module: nn.Module, kind: type[nn.Module]) -> bool:
    """``module`` is a plain ``kind``, whose weights the fast path may read and whose function it may
    compute itself: not a subclass or a stand-in (a LoRA wrapper, a quantized layer); a conv with zero
    padding, the exact (erf) GELU, a BatchNorm with its affine terms and running statistics; and a
    class whose ``forward`` is its own (:func:`own_forward`)."""
    if type(module) is not kind or not own_forward(kind):
        return False
    if kind is nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)  # oneDNN takes no "same"
    if kind is nn.GELU:
        return module.approximate == "none"
    if kind is nn.BatchNorm2d:  # (affine terms set to None after building: F.batch_norm's identity)
        return all(t is not None for t in (module.weight, module.bias, module.running_mean, module.running_var))
    return True


def own_forward(kind: type[nn.Module]) -> bool:
    """``kind``'s ``forward`` is the one its class was written with, not one a user patched onto the
    class (``nn.GELU.forward = ...``, ``MBConv.forward = ...``), which the fast path would not call.
    (A patch that copies the original's ``__qualname__``, as ``functools.wraps`` does, passes.)"""
    owner = next(c for c in kind.__mro__ if "forward" in vars(c))
    forward = vars(owner)["forward"]
    return (getattr(forward, "__qualname__", None) == f"{owner.__qualname__}.forward"
            and getattr(forward, "__module__", None) == owner.__module__)


def channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last memory, oneDNN's native layout. Under ``torch.func`` transforms, whose
    batched tensors have no memory format to ask for (vmap), as it is: the values are the same."""
    vmapped = not compiling() and torch._C._are_functorch_transforms_active()
    return x if vmapped else x.contiguous(memory_format=torch.channels_last)


def onednn_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype a CPU layer with ``weight`` computes ``x`` in (autocast's, else the input's) where
    oneDNN's fused kernels take it; None where they do not apply."""
    if not _ONEDNN or x.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu") and torch.float64 not in (x.dtype, weight.dtype):  # autocast skips float64
        dtype = torch.get_autocast_dtype("cpu")
    else:
        dtype = x.dtype if x.dtype == weight.dtype else None  # differing ones: the plain layer's error
    return dtype if dtype in _ONEDNN_DTYPES else None


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one conv that computes ``norm(conv(x))`` with the norm's running statistics.

    With fixed statistics BatchNorm is a per-channel affine map, ``x * scale + shift``, so it folds
    into the conv's weight and bias: the same function, up to float rounding. Computed in float32 at
    least, so that a bfloat16 model's folded weights are rounded once, at the end.
    """
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = norm.weight.to(dtype) * torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
    shift = norm.bias.to(dtype) - norm.running_mean.to(dtype) * scale
    if conv.bias is not None:
        shift = shift + conv.bias.to(dtype) * scale
    return conv.weight.to(dtype) * scale.view(-1, 1, 1, 1), shift


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> activation (GELU in the paper), the post-activation unit of the stem and MBConv.

    Layers and state dict as torchvision's ``Conv2dNormActivation``: ``0`` the conv (no bias), ``1``
    the norm, ``2`` the activation. At eager CPU inference, one folded (and where oneDNN takes the
    dtype, fused) convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 activation: str = "gelu"):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), ACTIVATIONS[activation]())
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, act = self
        # On a GPU the folded conv's bias is added in a pass of its own, by a generic broadcasting
        # kernel slower than BatchNorm's channels-last one: CoAtNet-0 in bfloat16 runs 12% faster
        # unfolded, float32 the same (H200; benchmarks/gpu_profile.py, variant ``folded``).
        if not (x.device.type == "cpu" and fusable(self) and exactly(conv, nn.Conv2d)
                and exactly(norm, nn.BatchNorm2d) and exactly(act, ACTIVATIONS[self.activation])):
            return super().forward(x)
        weight, bias = fold_batch_norm(conv, norm)
        dtype = onednn_dtype(x, conv.weight)
        if dtype is None:
            weight, bias = weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)
            return act(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))
        post_op, algorithm = _ONEDNN_POST_OPS.get(self.activation, ("none", ""))
        out = torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight.to(dtype), bias.to(dtype), conv.padding,
                                                      conv.stride, conv.dilation, conv.groups, post_op, [], algorithm)
        return out if self.activation in _ONEDNN_POST_OPS else out.relu_()


class FeedForward(nn.Sequential):
    """The Transformer block's FFN, ``Linear -> GELU -> Linear``; at eager CPU inference the GELU is
    a post-op of the first product's oneDNN kernel, so the widest tensor is written once."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self
        dtype = (onednn_dtype(x, fc1.weight) if fusable(self) and exactly(fc1, nn.Linear) and exactly(act, nn.GELU)
                 else None)
        if dtype is None:
            return super().forward(x)
        bias = None if fc1.bias is None else fc1.bias.to(dtype)
        hidden = torch.ops.mkldnn._linear_pointwise(x.to(dtype), fc1.weight.to(dtype), bias, "gelu", [], "none")
        return fc2(hidden)


class SpatialMean(torch.autograd.Function):
    """``x.mean((2, 3), keepdim=True)``: the same number and gradient, with fewer passes over ``x``'s map.

    - Forward, on the CPU an average pool over the whole map: in bfloat16, ``mean()`` would first
      copy the map to float32, a pass over the block's widest tensor that the pooling kernel,
      accumulating as it reads, saves. On a GPU torchvision's ``adaptive_avg_pool2d(x, 1)``, a
      ``mean()``: there the pool (a thread per output summing the whole map) is slower (2% at
      inference, H200, ``benchmarks/gpu_profile.py``).
    - Backward, the gradient as a broadcast view of the (B, C, 1, 1) one: autograd adds it to the
      gradient from the scaling in that one pass. ``mean()``'s own backward writes a whole map (on a
      GPU in NCHW order, then added to the channels-last one in a strided kernel), the pool's zeroes
      a map and scatters into it.
    """

    generate_vmap_rule = True  # torch.func's transforms (grad, jacrev, vmap) work through it

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, x.shape[-2:]) if x.device.type == "cpu" else F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # As sum()'s own gradient, a view: a hook that writes into it in place must clone it first.
        return (grad / (ctx.shape[-2] * ctx.shape[-1])).expand(ctx.shape)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # forward-mode AD
        return tangent.mean((2, 3), keepdim=True)


class SqueezeExcite(SqueezeExcitation):
    """torchvision's squeeze-excitation, ``x * sigmoid(fc2(act(fc1(mean(x)))))``: in eager execution
    the mean is :class:`SpatialMean`."""

    def _scale(self, x: Tensor) -> Tensor:
        # An exported graph keeps torchvision's pooling, any input size; so does a pool that is not
        # the plain global average, or one whose call must be seen (:func:`hooked`).
        pool = self.avgpool
        if (not eager_execution() or not exactly(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1))
                or hooked(pool)):
            return super()._scale(x)
        return self.scale_activation(self.fc2(self.activation(self.fc1(SpatialMean.apply(x)))))


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` over (B, heads, N, d) with a (1, heads, N, N) bias (Eq. 3).

    PyTorch's fused kernel where it runs; on the CPU it refuses a bias that needs a gradient
    (training), and its fallback adds passes over the scores that guard rows masked out entirely,
    which an additive bias never makes. There, in eager execution, the formula as written is 15%
    (float32) to 30% (bfloat16 autocast) faster, forward and backward. Outside a compiler it runs on
    every device under forward-mode AD and ``torch.func`` transforms (the fused kernels have no
    forward-mode derivative, and under ``torch.func.grad`` the bias's need of a gradient is not
    visible here) and under dispatch modes (``FlopCounterMode`` counts no FLOPs for the CPU's kernel).
    """
    if not compiling() and (transformed() or watched() or (
            q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)))):
        # The scale on q, not on the scores: a sixth of the elements at S3's 196 tokens of head size 32.
        return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def mbconv_inference(block: nn.Module, x: Tensor) -> Tensor:
    """An MBConv block where :func:`fusable`, as ``block(x)`` computes it, with the squeeze-excitation
    scaling in place on the depthwise conv's output: a fresh intermediate, the block's widest, so the
    copy is saved. On the CPU, also:

    - A batch whose hidden tensor would be too large for glibc's heap runs in even chunks that fit
      (``MAX_HEAP_BLOCK``): each image is computed on its own, BatchNorm using its running
      statistics. CoAtNet-0's S1 at batch 8 and 224x224 in float32 would make four 38 MB hidden
      tensors a pass; in halves, the same memory is reused instead of page-faulted in anew.
    - In bfloat16 the squeeze-excitation scaling and the residual add are folded into the 1x1
      projection after them (:func:`scaled_projection`).
    """
    residual = block.residual
    # Modules of other kinds in place of the paper's, or taken out (a user's, ``del residual.se``): the
    # block as it is. In eval mode torchvision's StochasticDepth passes its input through.
    se, depthwise = getattr(residual, "se", None), getattr(residual, "depthwise", None)
    if not (exactly(residual, nn.Sequential) and exactly(se, SqueezeExcite)
            and exactly(getattr(block, "drop_path", None), StochasticDepth)
            and (exactly(depthwise, nn.Conv2d) or type(depthwise) is ConvBNAct)):
        return block(x)
    expand = getattr(residual, "expand", None)
    expand = expand[0] if type(expand) is ConvBNAct else None
    if x.device.type == "cpu" and isinstance(expand, nn.Conv2d):
        height, width = x.shape[-2] // expand.stride[0], x.shape[-1] // expand.stride[1]
        per_image = expand.out_channels * height * width * x.element_size()
        chunks = -(-len(x) * per_image // MAX_HEAP_BLOCK)  # ceil: as few chunks as will fit, evened out
        if chunks > 1 and len(x) > 1:  # one image too large for the heap runs whole
            return torch.cat([mbconv_inference(block, part) for part in x.split(-(-len(x) // chunks))])
    *front, (last, se_or_norm), (_, project) = residual.named_children()
    hidden = x
    for name, layer in front:
        hidden = hidden.mul_(layer._scale(hidden)) if name == "se" else layer(hidden)
    if last != "se":  # the squeeze-excitation before the depthwise conv's norm (``se_before_norm``)
        return block.shortcut(x) + project(se_or_norm(hidden))
    scale = se_or_norm._scale(hidden)
    # A bfloat16 channels-last input, as in the network: the output has its dtype and memory format.
    # Only for what scaled_projection computes: a per-image, per-channel scale (not the per-pixel one
    # of a squeeze-excitation whose pool a user replaced) and a plain 1x1 projection.
    if (x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
            and exactly(project, nn.Conv2d) and onednn_dtype(x, project.weight) == torch.bfloat16
            and project.kernel_size == (1, 1) and project.stride == (1, 1) and project.padding == (0, 0)
            and project.groups == 1 and scale.shape == (*hidden.shape[:2], 1, 1)):
        return scaled_projection(project, hidden, scale, block.shortcut(x), torch.bfloat16)
    return block.shortcut(x) + project(hidden.mul_(scale))


def scaled_projection(project: nn.Conv2d, hidden: Tensor, scale: Tensor, residual: Tensor,
                      dtype: torch.dtype) -> Tensor:
    """``residual + project(hidden * scale)`` for a 1x1 conv and a per-image, per-channel ``scale``
    (B, C, 1, 1), without the scaled copy of ``hidden``: each image's scale goes into its own copy of
    the (small) weight, and one batched matmul over the channels-last tokens, in ``dtype``, adds the
    residual as it writes. In bfloat16 on AMX 1.4x (S2) to 2.7x (S1) faster than scaling, convolving
    and adding; in float32 slower, so used only in bfloat16 (``mbconv_inference``).
    """
    b, c, height, width = hidden.shape
    weight = project.weight.flatten(1).to(dtype) * scale.view(b, 1, c).to(dtype)  # (B, out, C)
    tokens = hidden.to(dtype).permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view, in channels-last
    out = residual.to(dtype).permute(0, 2, 3, 1).reshape(b, height * width, -1)
    out = torch.baddbmm(out, tokens, weight.transpose(1, 2))
    if project.bias is not None:
        out = out.add_(project.bias.to(dtype))
    return out.view(b, height, width, -1).permute(0, 3, 1, 2)


def compile_for_inference(model: nn.Module) -> Callable[..., Tensor]:
    """A compiled snapshot of ``model`` for serving: ``torch.compile`` with Inductor's freezing, where
    the weights are constants of the program, so BatchNorm folds into the convolutions and the
    weights are prepacked once for oneDNN (on CPUs with AMX, bfloat16 matmuls and convs at the matrix
    units' speed). Call it under ``torch.inference_mode()`` or ``torch.no_grad()``, with the dtype
    it will serve (a bfloat16 model, or autocast); the first call compiles.

    A snapshot, like an export: later changes to ``model``'s weights are not seen by it; compile
    again after them. ``model`` is put in eval mode. docs/performance.md has the figures.
    """
    compiled = torch.compile(model.eval())

    def serve(*args, **kwargs):
        # Inductor reads the flag while it compiles, at the first call (and at a recompile for a new
        # input shape), outside the scope of torch.compile's own options: set it around every call.
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return serve

