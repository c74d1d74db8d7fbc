"""``coatnet plan``: what each GPU needs to train a model, and the command that fits it.

Per GPU, in bytes:

* **State** (AdamW, float32 master weights). DDP replicates it: 4 B weights + 4 B gradients + 8 B
  for the two moments = 16 B per parameter. FSDP2 (``fully_shard`` on each block and on the root)
  shards all of it: 16 B / world size per parameter.
* **Working copies**, what a step holds besides the state. DDP: its gradient buckets (a second
  float32 copy of the gradients, 4 B/param, as ``train.py`` builds DDP without
  ``gradient_as_bucket_view``; none on one GPU, which trains without DDP) and, with ``--amp``, the
  bfloat16 weights autocast casts once per forward and autograd keeps for backward (2 B/param).
  FSDP: the largest unit unsharded twice
  (the one computing and the next one prefetched), in the compute dtype (2 B bfloat16 with
  ``--amp``, else 4 B), plus that unit's unsharded gradient before the reduce-scatter (compute
  dtype, and a float32 copy to reduce in with ``--amp``).
* **EMA** (``--ema DECAY``, on in the fine-tuning recipe): a float32 copy of the weights, 4 B per
  parameter, sharded like them with FSDP.
* **Activations**, measured, not guessed: the model is built on the ``meta`` device (shapes, no
  storage) and run forward in training mode under ``torch.autograd.graph.saved_tensors_hooks``,
  which sees every tensor autograd keeps for backward. Their storages are summed once each
  (views share one) and the weights' own are left out (counted above). Running batches of 2 and 4
  splits the figure into bytes per image and bytes per step (the relative-position biases, the
  same for every image). With ``--amp`` the model and batch are converted to bfloat16: meta tensors
  do not autocast, and this proxy reads ~3% under autocast, which keeps LayerNorm's inputs in
  float32 (measured on coatnet_0 at 224 with fake CUDA tensors: 85.7 vs 88.5 MiB per image).
  On meta, ``scaled_dot_product_attention`` runs its math path, which keeps the (N x N) attention
  probabilities; a GPU runs the memory-efficient kernel (flash attention takes no bias), which keeps
  q, k, v, the output and the log-sum-exp. The probe calls that kernel instead, as the GPU does
  (the math path would read 74% more for CoAtNet-7 at 512).
* **Activations with checkpointing** (``set_grad_checkpointing``: each block recomputed in
  backward): what non-reentrant checkpointing keeps (the blocks' inputs, the stem and head), measured
  the same way, plus the largest single block's own activations, alive while it is recomputed.
* **Allowance**: CUDA context, cuDNN/cuBLAS workspaces, backward's transient gradients of
  activations and the caching allocator's fragmentation, taken as 1.5 GiB + 20% of everything else.
  Measured on an H100 (torch 2.11, ``benchmarks/gpu_fsdp.py``): CoAtNet-5 at 224 px with FSDP,
  bfloat16, micro-batch 64, counted 49.6 GiB here; the run's tensors peaked at 51.6 GiB and
  PyTorch's allocator reserved 59.2 GiB (1.19x the count), which a 10% allowance missed.

The choice: DDP (simpler, less communication) if it fits, else FSDP; without checkpointing (a third
less compute) if it fits; the micro-batch is the largest divisor of the per-GPU batch that fits,
and gradient accumulation makes up the rest. A configuration "fits" when its micro-batch reaches
``min(8, per-GPU batch)``: below that BatchNorm's statistics (per GPU, per micro-batch) get noisy
and the GPU idles, so checkpointing or sharding is worth its cost. When nothing reaches it, the
configuration with the largest micro-batch is taken; when nothing fits one image, the plan says so.
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from .complexity import count_parameters
from .models import MBConv, TransformerBlock, create_model
from .models.registry import MODEL_SOURCES
from .text import json_text

GiB = 2**30
ADAMW_STATE_BYTES = 4 + 4 + 8  # float32 weights, gradients, two moments
ALLOWANCE_BYTES, ALLOWANCE_FRACTION = int(1.5 * GiB), 0.20
MIN_MICRO_BATCH = 8
PORT = 29500


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward: ``per_image`` x micro-batch + ``per_step``, without and
    with checkpointing."""

    per_image: int
    per_step: int
    per_image_checkpointed: int
    per_step_checkpointed: int
    probe: str  # how they were measured

    def at(self, micro_batch: int, checkpointing: bool) -> int:
        if checkpointing:
            return self.per_image_checkpointed * micro_batch + self.per_step_checkpointed
        return self.per_image * micro_batch + self.per_step


@dataclass(frozen=True)
class Memory:
    """One configuration's bytes per GPU at its micro-batch (0: not even one image fits)."""

    strategy: str  # "ddp" or "fsdp"
    grad_checkpointing: bool
    micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    ema: int
    working: int
    activations: int
    allowance: int
    total: int


@dataclass(frozen=True)
class Plan:
    model: str
    img_size: int
    params: int
    batch_size: int
    gpus: int
    nodes: int
    gpu_memory_gib: float
    amp: bool
    ema: float  # the EMA's decay; 0: none
    per_gpu_batch: int
    strategy: str
    grad_checkpointing: bool
    micro_batch: int
    grad_accum_steps: int
    activations: Activations
    options: tuple[Memory, ...]  # DDP, DDP + checkpointing, FSDP, FSDP + checkpointing
    command: str
    seconds: float  # to compute this plan
    note: str = ""  # a better batch size, where this one divides badly

    @property
    def chosen(self) -> Memory:
        return next(m for m in self.options
                    if (m.strategy, m.grad_checkpointing) == (self.strategy, self.grad_checkpointing))


class _EfficientAttention(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to the memory-efficient kernel a GPU picks for an
    attention with a bias, so the probe keeps what the GPU keeps (on meta SDPA takes the math path)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args
        out, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, kwargs.get("attn_mask"), True)
        return out


def _saved_bytes(model: nn.Module, batch: Tensor, gpu_attention: bool) -> tuple[int, list[int]]:
    """Bytes of the storages kept for backward by one training forward: in all, and the part each
    block keeps itself (first kept inside it). Weights and buffers are left out."""
    # Storages compared by their C++ object: on meta every data_ptr is 0. Each saved tensor keeps
    # its storage alive until the graph is dropped, so no address is reused meanwhile.
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    blocks = [m for m in model.modules() if isinstance(m, (MBConv, TransformerBlock))]
    per_block = [0] * len(blocks)
    inside: list[int] = []  # the block running now, if any

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own and storage._cdata not in seen:
            seen[storage._cdata] = storage.nbytes()
            if inside:
                per_block[inside[-1]] += storage.nbytes()
        return t

    def leave(*_) -> None:  # a forward hook's return value would replace the block's output
        inside.pop()

    hooks = [h for i, b in enumerate(blocks)
             for h in (b.register_forward_pre_hook(lambda *_, i=i: inside.append(i)), b.register_forward_hook(leave))]
    try:
        with saved_tensors_hooks(pack, lambda t: t), (_EfficientAttention() if gpu_attention else nullcontext()):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()), per_block


def measure_activations(name: str, img_size: int, amp: bool = True, device: str = "meta",
                        gpu_attention: bool = True) -> Activations:
    """Activation bytes of ``name`` training at ``img_size``, per image and per step, with and without
    checkpointing; in bfloat16 with ``amp``. ``device="cpu"`` runs real tensors (then ``gpu_attention``
    must be off: the memory-efficient kernel is CUDA's)."""
    dtype = torch.bfloat16 if amp else torch.float32
    with torch.device(device):
        model = create_model(name, img_size=img_size).to(dtype).train()
    totals, block_totals = {}, {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        for batch_size in (2, 4):
            batch = torch.zeros(batch_size, model.config.in_chans, img_size, img_size, device=device, dtype=dtype)
            totals[checkpointing, batch_size], blocks = _saved_bytes(model, batch, gpu_attention)
            if not checkpointing:
                block_totals[batch_size] = blocks
    # A line through batches 2 and 4: slope per image, intercept per step. Not through batch 1: there
    # the CPU's batched matmuls read some permuted views in place that they copy (and keep) at any
    # larger batch, so a line from batch 1 would tilt.
    per_image = {c: (totals[c, 4] - totals[c, 2]) // 2 for c in (False, True)}
    per_step = {c: totals[c, 2] - 2 * per_image[c] for c in (False, True)}
    # The block recomputed in backward that keeps the most per image: the largest at any batch of more
    # than a few images (a block's per-step part, its attention bias, is some MiB).
    largest = max(range(len(block_totals[2])), key=lambda i: (block_totals[4][i] - block_totals[2][i], i))
    block_image = (block_totals[4][largest] - block_totals[2][largest]) // 2
    block_step = block_totals[2][largest] - 2 * block_image
    probe = f"{device}, {'bfloat16' if amp else 'float32'}, batches 2 and 4 at {img_size} px"
    return Activations(per_image[False], per_step[False], per_image[True] + block_image,
                       per_step[True] + block_step, probe)


def _probe(name: str, img_size: int, amp: bool) -> Activations:
    """Measure on meta; if some operation has no meta kernel, on the CPU at a small size, scaled by
    pixels (which undercounts the attention's N x N bias per step, kept whole on the GPU)."""
    try:
        return measure_activations(name, img_size, amp)
    except NotImplementedError:
        small = 64
        a = measure_activations(name, small, amp, device="cpu", gpu_attention=False)
        scale = (img_size / small) ** 2
        return Activations(*(round(n * scale) for n in (a.per_image, a.per_step, a.per_image_checkpointed,
                                                        a.per_step_checkpointed)),
                           probe=f"meta failed: CPU probe at {small} px x {scale:g} (pixels), {a.probe}")


def _unit_sizes(model: nn.Module) -> list[int]:
    """Parameters of each FSDP unit: each block, and the root (stem, head, whatever is left)."""
    blocks = [count_parameters(m) for m in model.modules() if isinstance(m, (MBConv, TransformerBlock))]
    return blocks + [count_parameters(model) - sum(blocks)]


def _memory(strategy: str, checkpointing: bool, micro_batch: int, params: int, largest_unit: int, world: int,
            amp: bool, ema: bool, activations: Activations) -> Memory:
    compute_bytes = 2 if amp else 4
    if strategy == "ddp":
        weights, gradients, optimizer, ema_weights = 4 * params, 4 * params, 8 * params, 4 * params * ema
        # DDP's gradient buckets (one process trains without DDP); autocast's bfloat16 weights
        working = 4 * params * (world > 1) + (2 * params if amp else 0)
    else:
        weights, gradients, optimizer, ema_weights = (-(-n * params // world) for n in (4, 4, 8, 4 * ema))
        working = 2 * largest_unit * compute_bytes + largest_unit * (compute_bytes + (4 if amp else 0))
    kept = activations.at(micro_batch, checkpointing)
    rest = weights + gradients + optimizer + ema_weights + working + kept
    allowance = ALLOWANCE_BYTES + round(ALLOWANCE_FRACTION * rest)
    return Memory(strategy, checkpointing, micro_batch, weights, gradients, optimizer, ema_weights, working, kept,
                  allowance, rest + allowance)


def _best(strategy: str, checkpointing: bool, per_gpu_batch: int, budget: int, **kwargs) -> Memory:
    """The configuration at the largest micro-batch dividing the per-GPU batch that fits ``budget``
    (micro-batch 0, at one image, when none does)."""
    for micro_batch in _divisors(per_gpu_batch):
        memory = _memory(strategy, checkpointing, micro_batch, **kwargs)
        if memory.total <= budget:
            return memory
    return Memory(**asdict(_memory(strategy, checkpointing, 1, **kwargs)) | {"micro_batch": 0})


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, largest first, in sqrt(n) steps (a batch of 10**9 is a question too)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def command(plan_fields: dict) -> str:
    p = plan_fields
    flags = [f"--model {p['model']}", f"--img-size {p['img_size']}", f"--batch-size {p['batch_size']}"]
    flags += ["--fsdp"] * (p["strategy"] == "fsdp") + ["--amp"] * p["amp"]
    # repr: the decay as given (":g" keeps 6 digits: 0.9999999 read "--ema 1", which train refuses)
    flags += [f"--ema {p['ema']!r}"] * (p["ema"] > 0) + ["--grad-checkpointing"] * p["grad_checkpointing"]
    flags += [f"--grad-accum-steps {p['grad_accum_steps']}"] * (p["grad_accum_steps"] > 1)
    nodes = (f"--nnodes {p['nodes']} " if p["nodes"] > 1 else "")
    rendezvous = f"--rdzv-backend c10d --rdzv-endpoint HOST:{PORT} " if p["nodes"] > 1 else ""
    return f"torchrun {nodes}--nproc-per-node {p['gpus']} {rendezvous}-m coatnet train {' '.join(flags)}"


def make_plan(model: str, img_size: int | None = None, batch_size: int = 4096, gpus: int = 8,
              gpu_memory_gib: float = 80.0, nodes: int = 1, amp: bool = True, ema: float = 0.0) -> Plan:
    """The plan for training ``model`` with a global ``batch_size`` on ``nodes`` x ``gpus`` GPUs of
    ``gpu_memory_gib`` each, with an EMA of the weights of decay ``ema`` (0: none). Raises
    ValueError, in one line, when it cannot be done."""
    started = time.perf_counter()
    if model.startswith(MODEL_SOURCES):  # as training refuses it: the printed command would not run
        raise ValueError(f"--model takes a model name (see `coatnet info`), not {model}: plan the network that "
                         f"repository or folder holds by its name (training gives it to --pretrained)")
    with torch.device("meta"):
        net = create_model(model, img_size=img_size)
    height, width = net.config.img_size
    if height != width:  # training takes one --img-size, a square: a plan of 32x64 would be of 32x32
        raise ValueError(f"--img-size {height}x{width}: training runs square images; plan one size, e.g. "
                         f"{max(height, width)}")
    img_size = height
    world = gpus * nodes
    if batch_size % world:
        nearest = max(1, batch_size // world) * world
        raise ValueError(f"--batch-size {batch_size} does not split evenly across {world} GPUs "
                         f"({nodes} node(s) x {gpus}); use a multiple of {world}, e.g. {nearest}")
    per_gpu_batch = batch_size // world
    params = count_parameters(net)
    activations = _probe(model, img_size, amp)
    budget = int(gpu_memory_gib * GiB)
    shared = dict(per_gpu_batch=per_gpu_batch, budget=budget, params=params, largest_unit=max(_unit_sizes(net)),
                  world=world, amp=amp, ema=ema > 0, activations=activations)
    options = tuple(_best(s, c, **shared) for s in ("ddp", "fsdp") for c in (False, True))
    enough = min(MIN_MICRO_BATCH, per_gpu_batch)
    chosen = next((m for m in options if m.micro_batch >= enough), None) \
        or max(options, key=lambda m: m.micro_batch)  # max keeps the first of equals: the preferred one
    if chosen.micro_batch == 0:
        least = options[-1]
        raise ValueError(f"{model} at {img_size} px does not fit {gpu_memory_gib:g} GiB GPUs even with FSDP over "
                         f"{world} GPU{'s' * (world > 1)}, checkpointing and one image per step: it needs "
                         f"{math.ceil(least.total / GiB * 100) / 100:.2f} GiB per GPU; use more or larger GPUs, or a "
                         f"smaller --img-size")
    note = ""
    if chosen.micro_batch < enough:
        # Nothing fits a micro-batch of 8 that divides the per-GPU batch (a prime, say). Where some
        # configuration fits 8 images, a global batch of a multiple of 8 per GPU would.
        sizes = {k: v for k, v in shared.items() if k not in ("per_gpu_batch", "budget")}
        if any(_memory(s, c, enough, **sizes).total <= budget for s in ("ddp", "fsdp") for c in (False, True)):
            step = world * enough
            better = max(step, round(batch_size / step) * step)
            note = (f"note: no micro-batch of {enough} or more that divides {per_gpu_batch} images per GPU fits, so "
                    f"each step takes {chosen.micro_batch} at a time; --batch-size {better} ({better // world} per GPU) "
                    f"would run {enough} or more at a time")
    fields = dict(model=model, img_size=img_size, params=params, batch_size=batch_size, gpus=gpus, nodes=nodes,
                  gpu_memory_gib=gpu_memory_gib, amp=amp, ema=ema, per_gpu_batch=per_gpu_batch,
                  strategy=chosen.strategy,
                  grad_checkpointing=chosen.grad_checkpointing, micro_batch=chosen.micro_batch,
                  grad_accum_steps=per_gpu_batch // chosen.micro_batch, activations=activations, options=options,
                  note=note)
    return Plan(**fields, command=command(fields), seconds=round(time.perf_counter() - started, 2))


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def format_plan(plan: Plan) -> str:
    """The table (one column per configuration, the chosen one starred) and the command."""
    names = [("FSDP" if m.strategy == "fsdp" else "DDP") + (" + ckpt" if m.grad_checkpointing else "")
             + (" *" if m == plan.chosen else "") for m in plan.options]
    a = plan.activations
    rows = [("GiB per GPU", names),
            ("micro-batch", [str(m.micro_batch or "none") for m in plan.options]),
            ("weights (fp32)", [_gib(m.weights) for m in plan.options]),
            ("gradients (fp32)", [_gib(m.gradients) for m in plan.options]),
            ("optimizer state (AdamW)", [_gib(m.optimizer) for m in plan.options]),
            *[("EMA weights (fp32)", [_gib(m.ema) for m in plan.options])] * (plan.ema > 0),
            ("working copies", [_gib(m.working) for m in plan.options]),
            ("activations (x micro-batch)", [_gib(m.activations) for m in plan.options]),
            (f"allowance (1.5 GiB + {ALLOWANCE_FRACTION:.0%})", [_gib(m.allowance) for m in plan.options]),
            ("total", [_gib(m.total) for m in plan.options]),
            ("vs GPU memory", [f"{100 * m.total / (plan.gpu_memory_gib * GiB):.0f}%" for m in plan.options])]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(cells[i]) for _, cells in rows) for i in range(len(plan.options))]
    world = plan.gpus * plan.nodes
    lines = [f"{plan.model} at {plan.img_size} px, {plan.params / 1e6:.1f}M parameters; global batch {plan.batch_size} "
             f"on {world} x {plan.gpu_memory_gib:g} GiB GPUs = {plan.per_gpu_batch} per GPU; "
             f"{'bfloat16 mixed precision' if plan.amp else 'float32'}", ""]
    lines += [label.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, cols)) for label, cells in rows]
    lines += ["",
              f"activations per image: {a.per_image / 2**20:,.0f} MiB, {a.per_image_checkpointed / 2**20:,.0f} MiB "
              f"with checkpointing; per step: {a.per_step / 2**20:,.0f} / {a.per_step_checkpointed / 2**20:,.0f} MiB "
              f"(measured: {a.probe})",
              "working copies: DDP gradient buckets" + (" + autocast's bfloat16 weights" if plan.amp else "")
              + "; FSDP: the largest unit unsharded",
              f"chosen (*): {plan.strategy.upper()}{', checkpointing' if plan.grad_checkpointing else ''}, "
              f"micro-batch {plan.micro_batch} x {plan.grad_accum_steps} accumulation step(s) per GPU "
              f"(planned in {plan.seconds:.1f} s)", *([plan.note] if plan.note else []), "", plan.command]
    if plan.nodes > 1:
        lines.append(f"  (on each of the {plan.nodes} machines; HOST: the first one's address, port {PORT} open)")
    lines.append("  add --recipe, --data and --data-dir as for any training run"
                 + ("; --recipe imagenet1k-finetune keeps an EMA of the weights, which this plan does not count: "
                    "plan it with --ema 0.9999" if plan.ema == 0 else ""))
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    plan = make_plan(args.model, args.img_size, args.batch_size, args.gpus, args.gpu_memory, args.nodes, args.amp,
                     args.ema)
    print(json_text(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0
