"""``coatnet bench``: images/s of inference and of a training step, beside timm's CoAtNet.

How it measures, so that the figures can be trusted on a shared machine:

* As users call the models: inference is ``model.eval()`` and ``torch.inference_mode()`` on an
  ordinary NCHW float32 batch; a training step is ``model.train()``, forward, cross-entropy,
  backward and an AdamW step. Inference and training use separate instances of each model, so the
  weights at inference stay fixed, as in deployment.
* One process, interleaved: after the warm-up (allocations, kernel selection, the folded
  inference weights), each of ``--repeats`` rounds times every measurement once in turn (ours,
  timm, ..., the matmul), so a slow spell of the machine hits them all alike. Reported: the median
  and the min..max of the rounds; ratios are of medians.
* The machine's limit: a square float32 ``torch.mm`` timed in the same rounds. The achieved
  fraction is model FLOP/s over matmul FLOP/s, with model FLOPs = 2 x the multiply-adds counted by
  :func:`coatnet.complexity.count_flops`, and a training step counted as 3 forward passes (the
  backward pass takes two products per product of the forward pass: input and weight gradients).
* Peak training memory: in a fresh process per model (spawned), two training steps, reading the
  peak resident memory of the process (``ru_maxrss``) minus what it held before the model was
  built: weights, gradients, AdamW state and activations, as the operating system sees them. A
  fresh process because a process's peak never goes down, so the second model measured in one
  process would read the first one's peak. On CUDA: ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .complexity import count_flops
from .models import create_model

WARMUP = 2
TIMM_MODELS = {f"coatnet_{n}": f"coatnet_{n}_224" for n in range(6)}  # timm's paper-style CoAtNet-0..5


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ValueError("--compare timm needs timm: pip install 'coatnet[bench]'") from None
    return timm


def build(implementation: str, name: str, img_size: int) -> nn.Module:
    """Our ``name``, or timm's matching paper-style CoAtNet (random init, nothing downloaded)."""
    if implementation == "coatnet":
        return create_model(name, img_size=img_size)
    if name not in TIMM_MODELS:
        raise ValueError(f"timm has no paper-style counterpart of {name}; compare {', '.join(TIMM_MODELS)}")
    return _import_timm().create_model(TIMM_MODELS[name], pretrained=False, img_size=img_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run() -> None:
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def _peak_train_memory(implementation: str, name: str, img_size: int, batch_size: int, threads: int | None,
                       device: str) -> float:
    """Run in a fresh process: peak memory of two training steps, in MiB, over the process's base."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if implementation == "timm":
        _import_timm()  # its import is part of the base, not of the model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(implementation, name, img_size).to(device)
    step = _train_step(model, torch.randn(batch_size, 3, img_size, img_size, device=device))
    for _ in range(2):  # the second step runs with the AdamW state in place
        step()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def peak_train_memory(*args) -> float:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_peak_train_memory, *args).result()


@dataclass
class Measurement:
    implementation: str  # "coatnet" or "timm"
    model: str
    mode: str  # "inference" or "train"
    compiled: bool
    run: Callable[[], None] = field(repr=False)
    flop_per_image: float = 0.0  # FLOP (2 x multiply-adds) of the step, per image
    seconds: list[float] = field(default_factory=list)
    peak_train_mib: float | None = None


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--batch-size and --repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    implementations = ["coatnet"] + (["timm"] if args.compare == "timm" else [])
    if args.compare == "timm":
        _import_timm()
        if args.model not in TIMM_MODELS:  # before building anything
            raise ValueError(f"timm has no paper-style counterpart of {args.model}; compare {', '.join(TIMM_MODELS)}")

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    measurements = []
    variants = [False, True] if args.compile else [False]
    for mode, make in (("inference", _inference), ("train", _train_step)):
        for compiled in variants:
            for impl in implementations:
                model = build(impl, args.model, args.img_size).to(device)
                flop = 2 * count_flops(model, args.img_size, in_chans=3) * (1 if mode == "inference" else 3)
                if compiled:
                    model = torch.compile(model)
                measurements.append(Measurement(impl, args.model, mode, compiled, make(model, x), flop))

    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = Measurement("torch", "mm", "matmul", False, lambda: torch.mm(a, b), 2 * n**3)

    jobs = measurements + [matmul]
    for job in jobs:
        for _ in range(WARMUP):
            job.run()
    _sync(device)
    for _ in range(args.repeats):
        for job in jobs:
            start = time.perf_counter()
            job.run()
            _sync(device)
            job.seconds.append(time.perf_counter() - start)

    for m in measurements:
        if m.mode == "train" and not m.compiled:
            m.peak_train_mib = peak_train_memory(m.implementation, m.model, args.img_size, args.batch_size,
                                                 args.threads, args.device)

    matmul_flops = [matmul.flop_per_image / s for s in matmul.seconds]
    rows = []
    for m in measurements:
        images = [args.batch_size / s for s in m.seconds]
        ips = statistics.median(images)
        timm = next((t for t in measurements if t.implementation == "timm" and t.mode == m.mode
                     and t.compiled == m.compiled), None)
        vs_timm = None
        if timm is not None and m is not timm:
            vs_timm = ips / statistics.median(args.batch_size / s for s in timm.seconds)
        achieved = m.flop_per_image * ips
        rows.append(dict(
            implementation=m.implementation, model=m.model if m.implementation == "coatnet" else TIMM_MODELS[m.model],
            mode=m.mode, compiled=m.compiled, images_per_s=_spread(images), vs_timm=vs_timm,
            gflop_per_image=m.flop_per_image / 1e9, achieved_gflops=achieved / 1e9,
            matmul_fraction=achieved / statistics.median(matmul_flops), peak_train_mib=m.peak_train_mib))
    result = dict(model=args.model, img_size=args.img_size, batch_size=args.batch_size, dtype="float32",
                  device=str(device), threads=torch.get_num_threads(), repeats=args.repeats, warmup=WARMUP,
                  torch=torch.__version__, matmul_size=n,
                  matmul_gflops=_spread([f / 1e9 for f in matmul_flops]), rows=rows)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def format_table(result: dict) -> str:
    mm = result["matmul_gflops"]
    lines = [f"coatnet bench: {result['model']}, {result['img_size']}x{result['img_size']}, batch "
             f"{result['batch_size']}, {result['dtype']}, {result['device']}, {result['threads']} threads, torch "
             f"{result['torch']}; median (min..max) of {result['repeats']} interleaved rounds",
             f"matmul {result['matmul_size']}x{result['matmul_size']}: {mm['median']:.1f} GFLOP/s "
             f"({mm['min']:.1f}..{mm['max']:.1f})", ""]
    header = ("model", "mode", "images/s", "vs timm", "GFLOP/s", "of matmul", "peak train MiB")
    table = [header]
    for r in result["rows"]:
        ips = r["images_per_s"]
        table.append((r["model"] + (" (compiled)" if r["compiled"] else ""), r["mode"],
                      f"{ips['median']:.2f} ({ips['min']:.2f}..{ips['max']:.2f})",
                      "-" if r["vs_timm"] is None else f"{r['vs_timm']:.2f}x", f"{r['achieved_gflops']:.1f}",
                      f"{100 * r['matmul_fraction']:.0f}%",
                      "-" if r["peak_train_mib"] is None else f"{r['peak_train_mib']:.0f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in table]
    lines.append("GFLOP/s: 2 x multiply-adds x images/s, a training step counted as 3 forward passes; "
                 "peak train MiB: a fresh process per model, peak RSS over its base")
    return "\n".join(lines)
