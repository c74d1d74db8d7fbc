"""``coatnet bench``: images/s of inference and of a training step, beside timm's CoAtNet.

How it measures, so that the figures can be trusted on a shared machine:

* As users call the models: inference is ``model.eval()`` and ``torch.inference_mode()`` on an
  ordinary NCHW float32 batch; a training step is ``model.train()``, forward, cross-entropy,
  backward and a step of AdamW as ``coatnet train`` builds it (fused), for both models alike,
  with the paper's stochastic depth rate.
* Each measurement (a model in one mode, or the matmul) lives in its own fresh process, as a
  model does in a user's program. In one shared process the models would share glibc's heap:
  whichever frees large blocks first changes how the next one's allocations are served (reused
  heap pages, or fresh ``mmap``s that page-fault on first touch), which moved timm's CoAtNet-0
  inference from 10 to 22 images/s here depending on what ran before it.
* Interleaved: after the warm-up (allocations, kernel selection, the folded inference weights),
  each of ``--repeats`` rounds asks every process in turn for one timed run, so a slow spell of
  the machine hits them all alike. Reported: the median and the min..max of the rounds; ratios
  are of medians.
* Steady state: each timed run follows an untimed one in the same process, so it finds the caches
  and clocks as a loop of calls leaves them, not as the eight other processes left them. A single
  cold call understates the matmul most (on a 2-core Xeon in bfloat16, 1,376-1,605 GFLOP/s cold
  against 1,959-2,106 steady, our inference 54-58 against 64 images/s), so fractions of it read high.
* ``--dtype``: ``float32`` as PyTorch runs it by default. On a GPU that is cuDNN's convolutions on
  TF32 tensor cores and matmuls in true float32, so timm's CoAtNet, whose attention and MLP
  products are 1x1 convolutions, computes them in TF32 where ours (linear layers) computes them in
  float32. ``tf32`` (CUDA only): every product of both models, and the matmul, on TF32 tensor
  cores. ``bfloat16``: autocast, as ``coatnet train --amp``.
* The machine's limit: a square ``torch.mm`` in the same dtype, timed in the same rounds. The achieved
  fraction is model FLOP/s over matmul FLOP/s, with model FLOPs = 2 x the multiply-adds counted by
  :func:`coatnet.complexity.count_flops`, a training step counted as 3 forward passes (the
  backward pass takes two products per product of the forward pass: input and weight gradients).
* ``--compile`` adds compiled rows, for both models alike: inference through
  :func:`coatnet.compile_for_inference` (Inductor with freezing: the weights become constants),
  the training step through plain ``torch.compile``.
* ``--onnx`` adds the way to serve the model without PyTorch: exported to ONNX as ``coatnet
  export`` does, run by onnxruntime on the CPU (inference, float32; its peak memory includes the
  export, which happens in the same process).
* Peak memory: the process's peak resident memory (``VmHWM``) at the end, minus what it held
  before the model was built: weights, and for training gradients, AdamW state and activations,
  as the operating system sees them. On CUDA: ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cli import out_of_memory
from .models import compile_for_inference, timm_variants
from .train import make_optimizer
from .text import json_text
from .validate import resolve_device, slow_bfloat16

WARMUP = 2
# The matmul's rounds differed by 1.2x at most in quiet runs here (2 CPU cores; a GPU's by 6%); by
# 1.9x and 3.9x where something else shared the machine, which took 23% and 77% off our model's.
NOISY_SPREAD = 1.5
# The longest a measurement's process may take to answer (a build with compiles included) before
# it counts as hung: its row fails, the others go on.
REPLY_TIMEOUT_S = 3600.0
# How long the measurements' processes that answered their last request get, all together, to exit
# on their own, cleaning up after themselves (a compiled model's worker pool); past it, they are killed.
EXIT_TIMEOUT_S = 60.0
# timm's model of each of ours: its paper-style CoAtNet-0..5, and the rw variants its weights are of.
TIMM_MODELS = {f"coatnet_{n}": f"coatnet_{n}_224" for n in range(6)} | {v: f"{v}_224" for v in timm_variants()}


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ValueError("--compare timm needs timm: pip install 'coatnet[bench]'") from None
    return timm


@dataclass(frozen=True)
class Job:
    """One measurement, run in its own process."""

    implementation: str  # "coatnet", "timm", "onnxruntime" (ours, exported), or "torch" for the matmul
    model: str  # our name (timm's matching name is looked up), or "mm"
    mode: str  # "inference", "train" or "matmul"
    compiled: bool
    img_size: int  # the input's side; for the matmul, the side of its square matrices
    batch_size: int
    threads: int | None
    device: str
    dtype: str = "float32"  # "bfloat16": the model under autocast, the matmul in bfloat16; "tf32": CUDA's TF32

    @property
    def label(self) -> str:
        name = self.model
        if self.implementation == "timm":  # timm's name says 224; built at another size, the row says which
            name = TIMM_MODELS[self.model] + ("" if self.img_size == 224 else f" at {self.img_size}")
        suffix = " (compiled)" if self.compiled else " (onnxruntime)" if self.implementation == "onnxruntime" else ""
        return name + suffix


def build(implementation: str, name: str, img_size: int) -> nn.Module:
    """Our ``name``, or timm's matching CoAtNet (random init, nothing downloaded).

    Both train with the stochastic depth rate of the paper's recipe (Table 10), ours by default;
    timm's default is none, which would leave it less work per training step.
    """
    from .models import create_model

    if implementation != "timm":  # ours, eager or to be exported for onnxruntime
        return create_model(name, img_size=img_size)
    with torch.device("meta"):  # our configuration only, without allocating weights
        config = create_model(name).config
    # Our head's classes too: timm's default is its weights' (coatnet_3_rw_224: 11,821, ImageNet-12k),
    # 16.6M parameters more to train and step than ours.
    return _import_timm().create_model(TIMM_MODELS[name], pretrained=False, img_size=img_size,
                                       drop_path_rate=config.drop_path_rate, num_classes=config.num_classes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(job: Job, device: torch.device) -> tuple[Callable[[], None], float]:
    """The function one timed run calls, and its FLOP (2 x multiply-adds) per image (per mm for the matmul)."""
    if job.mode == "matmul":
        n = job.img_size
        dtype = torch.bfloat16 if job.dtype == "bfloat16" else torch.float32
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        return (lambda: torch.mm(a, b)), 2.0 * n**3
    from .complexity import count_flops

    model = build(job.implementation, job.model, job.img_size).to(device)
    flop = 2.0 * count_flops(model, job.img_size, in_chans=3) * (1 if job.mode == "inference" else 3)
    x = torch.randn(job.batch_size, 3, job.img_size, job.img_size, device=device)
    if job.implementation == "onnxruntime":
        return _onnxruntime_session(model, x, job.threads), flop
    # bfloat16 as training with --amp runs it: float32 weights, autocast around the forward pass.
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=job.dtype == "bfloat16")
    if job.mode == "inference":
        model.eval()
        forward = compile_for_inference(model) if job.compiled else model  # the fastest way to serve it

        def run() -> None:
            with torch.inference_mode(), autocast:
                forward(x)
        return run, flop
    model.train()
    forward = torch.compile(model) if job.compiled else model
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.05)
    target = torch.randint(0, 1000, (job.batch_size,), device=device)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, flop


def _onnxruntime_session(model: nn.Module, x: torch.Tensor, threads: int | None) -> Callable[[], None]:
    """Our model as a user serves it without PyTorch: exported to ONNX (``coatnet export``), run by
    onnxruntime on the CPU at the same batch."""
    import tempfile

    import onnxruntime

    from .export import export_model

    with tempfile.TemporaryDirectory() as folder:
        path = export_model(model, "onnx", Path(folder) / "model.onnx", img_size=x.shape[-1], batch_size=len(x))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, all cores
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {"images": x.cpu().numpy()}
    return lambda: session.run(None, inputs)


def _peak_mib(device: torch.device) -> float:
    """The process's peak memory so far, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # On Linux, ru_maxrss carries over the parent's peak through fork and exec (a spawned process
    # starts with it); VmHWM is this process's own.
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def _worker(job: Job, conn) -> None:
    """A measurement's process: its imports, then, when asked, build and warm up; then one timed run
    per request; at the end, peak memory."""
    try:
        if job.threads:
            torch.set_num_threads(job.threads)
        if job.dtype == "tf32":  # float32 products on TF32 tensor cores, matmuls and convolutions alike
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        device = torch.device(job.device)
        if job.implementation == "timm":
            _import_timm()  # its import is part of the base, not of the model
        if conn.recv() != "build":
            return
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = _peak_mib(device)
        run, flop = _prepare(job, device)
        for _ in range(WARMUP):
            run()
        _sync(device)
        conn.send(("ready", flop))
        while conn.recv() == "run":
            run()  # untimed: the timed call finds caches and clocks as a back-to-back loop leaves them
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            conn.send(time.perf_counter() - start)
        conn.send(_peak_mib(device) - base)
    except Exception as e:  # reported by the parent as one line
        # Out of memory, PyTorch's message is a paragraph (CUDA) or an allocator's (CPU); what to do is short
        if out_of_memory(e):
            conn.send(("error", f"{job.label} {job.mode}: out of memory: every row's process holds its model on "
                                f"{job.device} at once; lower --batch-size"))
        else:
            conn.send(("error", f"{job.label} {job.mode}: {type(e).__name__}: {' '.join(str(e).split())}"))


class Runner:
    """The parent's handle on one measurement's process."""

    def __init__(self, job: Job, context):
        self.job = job
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(job, child), daemon=True)
        # Ctrl-C reaches every process of the terminal's group; the parent says so in one line and ends
        # the others, which start with SIGINT ignored (a Python started so keeps it so), tracebacks unsaid.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.seconds: list[float] = []
        self.flop = self.peak_mib = 0.0
        self.finished = False  # its process answered the last request and is ending on its own
        self.error: str | None = None  # why its measurement failed (its row says so; the others go on)

    def _request(self, message: str | None, listen: bool = True):
        """Send ``message`` (None: only listen) and return the reply (``listen``); None where the
        measurement failed, its process died (e.g. out of memory) or hangs, which ``error`` then says
        in one line."""
        name = f"{self.job.label} {self.job.mode}"
        try:
            if message is not None:
                self.conn.send(message)
            if not listen:
                return None
            if self.conn.poll(REPLY_TIMEOUT_S):
                reply = self.conn.recv()
            else:
                self.process.kill()
                reply = ("error", f"{name}: no answer in {REPLY_TIMEOUT_S:.0f} s, its process hangs")
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join(5)
            killed = self.process.exitcode == -signal.SIGKILL  # on Linux, most often the out-of-memory killer
            reply = ("error", f"{name}: its process ended" + (
                " (killed, most likely out of memory; lower --batch-size)" if killed else ""))
            with contextlib.suppress(EOFError, OSError):  # it said why before it ended (failed before "build")
                if self.conn.poll(0):
                    reply = self.conn.recv()
        if isinstance(reply, tuple) and reply[0] == "error":
            self.error = reply[1]
            return None
        return reply

    def build(self) -> None:
        """Let the process, started and importing, build its model and warm up."""
        self._request("build", listen=False)

    def wait_ready(self) -> None:
        if self.error is None:
            reply = self._request(None)
            if reply is not None:
                self.flop = reply[1]

    def time_one(self) -> None:
        seconds = self._request("run")
        if seconds is not None:
            self.seconds.append(seconds)

    def finish(self) -> None:
        peak = self._request("stop")
        if peak is not None:
            self.peak_mib, self.finished = peak, True


def _median_range(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(args: argparse.Namespace) -> int:
    from .models import create_model, model_entry

    name = model_entry(args.model).name  # ours for timm's names; an unknown one fails here, listing the known ones
    with torch.device("meta"):  # a size the model refuses fails here in one line, not in every row
        built = create_model(args.model, img_size=args.img_size)
    args.img_size = min(built.config.img_size)  # by default the model's own: 384 for coatnet_rmlp_2_rw_384
    device = resolve_device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.threads and cores and args.threads > cores:
        print(f"coatnet bench: note: --threads {args.threads} is more than this machine's {cores} cores: its "
              f"threads take turns on them", file=sys.stderr)
    if args.dtype == "bfloat16" and (why := slow_bfloat16(device)):
        print(f"coatnet bench: note: {why}, the matmul included", file=sys.stderr)
    implementations = ["coatnet"]
    if args.compare == "timm":
        _import_timm()
        if name not in TIMM_MODELS:  # before building anything
            raise ValueError(f"timm has no counterpart of {args.model}; compare {', '.join(TIMM_MODELS)}")
        implementations.append("timm")
    if args.dtype == "tf32" and (device.type != "cuda" or torch.version.hip
                                 or torch.cuda.get_device_capability(device) < (8, 0)):
        raise ValueError("--dtype tf32 is a precision of NVIDIA GPUs from Ampere (sm_80) on: add --device cuda "
                         "on such a GPU, or use float32 or bfloat16")
    if args.onnx:
        if device.type != "cpu" or args.dtype != "float32":
            raise ValueError("--onnx times onnxruntime on the CPU in float32: drop --device and --dtype")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("--onnx needs onnx and onnxruntime: pip install 'coatnet[export]'") from None

    common = dict(batch_size=args.batch_size, threads=args.threads, device=args.device, dtype=args.dtype)
    jobs = [Job(impl, name, mode, compiled, args.img_size, **common)
            for mode in ("inference", "train") for compiled in ([False, True] if args.compile else [False])
            for impl in implementations]
    if args.onnx:  # after our eager inference row, before timm's
        jobs.insert(1, Job("onnxruntime", name, "inference", False, args.img_size, **common))
    mm_size = 2048 if device.type == "cpu" else 8192
    jobs.append(Job("torch", "mm", "matmul", False, mm_size, **common))

    context = multiprocessing.get_context("spawn")  # fresh processes, whatever the parent holds
    runners = []
    try:
        # Every process imports at once (seconds each, nothing timed). They build and warm up on the CPU
        # one at a time, so as not to crowd the cores and memory the others are warming up on; on a GPU
        # all at once: their compiles share the host's cores, and nothing is timed before all are ready.
        for job in jobs:
            runners.append(Runner(job, context))
        for runner in runners:
            runner.build()
            if device.type == "cpu":
                runner.wait_ready()
        if device.type != "cpu":
            for runner in runners:
                runner.wait_ready()
        matmul = runners[-1]
        for _ in range(args.repeats):
            if matmul.error:
                break
            for runner in runners:
                if runner.error is None:  # a row that failed says so; the others go on
                    runner.time_one()
        for runner in runners:
            if runner.error is None:
                runner.finish()
        if matmul.error:
            raise ValueError(f"the matmul, the measure of every row, failed: {matmul.error}")
    finally:
        deadline = time.monotonic() + EXIT_TIMEOUT_S  # one for all: they end side by side
        for runner in runners:
            if runner.finished:
                runner.process.join(max(deadline - time.monotonic(), 0))
            runner.process.kill()  # no-op for a process that has ended

    matmul_flops = statistics.median(matmul.flop / s for s in matmul.seconds)
    rows = []
    for r in runners[:-1]:
        row = dict(implementation=r.job.implementation, model=r.job.label, mode=r.job.mode, compiled=r.job.compiled)
        if r.error:
            rows.append(row | dict(error=r.error))
            continue
        images = [args.batch_size / s for s in r.seconds]
        ips = statistics.median(images)
        timm = next((t for t in runners if t.job.implementation == "timm" and t.job.mode == r.job.mode
                     and t.job.compiled == r.job.compiled and not t.error), None)
        vs_timm = None
        if timm is not None and r is not timm:
            vs_timm = ips / statistics.median(args.batch_size / s for s in timm.seconds)
        achieved = r.flop * ips
        rows.append(row | dict(images_per_s=_median_range(images), vs_timm=vs_timm, gflop_per_image=r.flop / 1e9,
                               achieved_gflops=achieved / 1e9, matmul_fraction=achieved / matmul_flops,
                               peak_mib=r.peak_mib))
    result = dict(model=args.model, img_size=args.img_size, batch_size=args.batch_size, dtype=args.dtype,
                  device=str(device), threads=args.threads or torch.get_num_threads(), repeats=args.repeats,
                  warmup=WARMUP, torch=torch.__version__, matmul_size=mm_size,
                  matmul_gflops=_median_range([matmul.flop / s / 1e9 for s in matmul.seconds]), rows=rows)
    print(json_text(result, indent=2) if args.json else format_table(result))
    return 1 if any("error" in row for row in rows) else 0


def format_table(result: dict) -> str:
    mm = result["matmul_gflops"]
    threads = f"{result['threads']} thread{'s' * (result['threads'] != 1)}"
    lines = [f"coatnet bench: {result['model']}, {result['img_size']}x{result['img_size']}, batch "
             f"{result['batch_size']}, {result['dtype']}, {result['device']}, {threads}, torch "
             f"{result['torch']}; median (min..max) of {result['repeats']} interleaved rounds",
             f"matmul {result['matmul_size']}x{result['matmul_size']}: {mm['median']:.1f} GFLOP/s "
             f"({mm['min']:.1f}..{mm['max']:.1f})", ""]
    noisy = [f"{r['model']} {r['mode']} ({r['images_per_s']['max'] / r['images_per_s']['min']:.1f}x)"
             for r in result["rows"] if "error" not in r
             and r["images_per_s"]["max"] > NOISY_SPREAD * r["images_per_s"]["min"]]
    if mm["max"] > NOISY_SPREAD * mm["min"]:
        lines.insert(2, f"note: the matmul's rounds differ by {mm['max'] / mm['min']:.1f}x: something else is using "
                        f"this machine, so every figure here is noisy; measure again on a quiet machine to compare")
    elif noisy:
        lines.insert(2, f"note: the rounds of {', '.join(noisy)} differ by more than {NOISY_SPREAD}x: something "
                        f"else is using this machine, so those figures are noisy; measure again on a quiet machine "
                        f"to compare")
    # "vs timm" is a ratio of images/s: where timm's model does other work per image (its paper-style
    # CoAtNet-0..5 put the MBConv's down-sampling stride on the depthwise conv, Table 9's variant:
    # +2% to +10% multiply-adds), the ratio is partly the networks', not the code's; say so.
    inference = [r for r in result["rows"] if r["mode"] == "inference" and "error" not in r
                 and "gflop_per_image" in r and not r.get("compiled")]
    mine = next((r["gflop_per_image"] for r in inference if r.get("implementation") == "coatnet"), None)
    for r in inference:
        theirs = r["gflop_per_image"]
        if r.get("implementation") == "timm" and mine and abs(theirs / mine - 1) > 0.01:
            more = "more" if theirs > mine else "fewer"
            lines.insert(len(lines) - 1, f"note: {r['model']} does {100 * abs(theirs / mine - 1):.1f}% {more} "
                                         f"multiply-adds per image than ours ({theirs / 2:.2f} against {mine / 2:.2f} "
                                         f"G): 'vs timm' compares images/s, so part of it is the networks' "
                                         f"difference; GFLOP/s and 'of matmul' compare the rate")
    header = ("model", "mode", "images/s", "vs timm", "GFLOP/s", "of matmul", "peak MiB")
    table = [header]
    for r in result["rows"]:
        if "error" in r:
            table.append((r["model"], r["mode"], "failed", "", "", "", ""))
            continue
        ips = r["images_per_s"]
        table.append((r["model"], r["mode"], f"{ips['median']:.2f} ({ips['min']:.2f}..{ips['max']:.2f})",
                      "-" if r["vs_timm"] is None else f"{r['vs_timm']:.2f}x", f"{r['achieved_gflops']:.1f}",
                      f"{100 * r['matmul_fraction']:.0f}%", f"{r['peak_mib']:.0f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in table]
    lines.append("GFLOP/s: 2 x multiply-adds x images/s, a training step counted as 3 forward passes; "
                 "each row is its own process; peak MiB: its peak memory over its base")
    lines += [f"failed: {r['error']}" for r in result["rows"] if "error" in r]
    return "\n".join(lines)
