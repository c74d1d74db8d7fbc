"""Where a GPU's time goes in CoAtNet-0, ours beside timm's: for each case, images/s (median of 20
timed calls, after warm-up), the GPU's busy fraction (summed kernel time over wall time: the rest is
launch overhead and gaps), the kernel time by kind, and the kernels that take the most.

A case is ``IMPL-DTYPE-MODE[-compiled][-VARIANT]``, e.g. ``coatnet-bfloat16-inference``; its call is
built as ``coatnet bench`` builds it (``bench._prepare``) and timed back to back. Variants:
  ``tf32``     float32 products on TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``;
               PyTorch's default keeps them float32, while cuDNN's convolutions use TF32)
  ``notf32``   cuDNN's convolutions in float32 too (``torch.backends.cudnn.allow_tf32 = False``)
  ``folded``   ours with BatchNorm folded into the convolutions at eager inference, as on the CPU
               (on a GPU the plain layers run: README, Performance)
  ``ckpt``     the training step with activation checkpointing (``set_grad_checkpointing``, as
               ``coatnet train --grad-checkpointing``): its cost in time, its saving in memory
  ``cudagraphs`` compiled with ``mode="reduce-overhead"`` (CUDA graphs: one launch per graph
               instead of one per kernel) instead of the default mode
Variants combine: ``coatnet-bfloat16-train-compiled-ckpt``.
The script exits 1 if a case failed (each is reported and the others still run).

Run by benchmarks/gpu_check.sh (stage ``profile``); ``python benchmarks/gpu_profile.py CASE...``.
"""

import argparse
import functools
import re
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from coatnet import bench
from coatnet.models import fast_path

IMPLEMENTATIONS, DTYPES, MODES = ("coatnet", "timm"), ("float32", "bfloat16"), ("inference", "train")
VARIANTS = ("tf32", "notf32", "folded", "ckpt", "cudagraphs")

KINDS = [  # first match wins; kernel names of cuBLAS, cuDNN, CUTLASS, PyTorch and Inductor
    ("matmul / conv", r"^triton_tem"),  # Inductor's matmul templates
    ("fused elementwise (Triton)", r"^triton_"),  # its names list the ops fused, convolution included
    ("attention", r"fmha|attention|flash|sdpa|softmax"),
    ("depthwise conv", r"depthwise|dwconv|c1_k1"),
    ("norm", r"norm|welford|bn_|GammaBeta"),
    ("copy / layout", r"nchwToNhwc|nhwcToNchw|copy|transpose|permute|CatArray"),
    ("matmul / conv", r"gemm|xmma|cutlass|wgmma|nvjet|implicit|conv|cudnn|dgrad|wgrad|fprop"),
    ("pooling / reduction", r"pool|reduce|mean"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|sigmoid|mul|add"),
]


plain_forward, plain_build, plain_compile = fast_path.ConvBNAct.forward, bench.build, torch.compile
plain_compile_for_inference = bench.compile_for_inference


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``ConvBNAct`` at eager inference with BatchNorm folded into the conv on any device."""
    conv, norm, act = self
    if not fast_path.fusable(self):
        return torch.nn.Sequential.forward(self, x)
    weight, bias = fast_path.fold_batch_norm(conv, norm)
    weight, bias = weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)
    return act(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


def parse(case: str) -> tuple[str, str, str, bool, set[str]]:
    impl, dtype, mode, *rest = case.split("-")
    compiled = "compiled" in rest
    variants = set(rest) - {"compiled"}
    if impl not in IMPLEMENTATIONS or dtype not in DTYPES or mode not in MODES or not variants <= set(VARIANTS):
        raise ValueError(f"unknown case {case!r}: IMPL-DTYPE-MODE[-compiled][-VARIANT...] with IMPL in {IMPLEMENTATIONS}, "
                         f"DTYPE in {DTYPES}, MODE in {MODES}, VARIANT in {VARIANTS}")
    return impl, dtype, mode, compiled, variants


def with_variants(variants: set[str]) -> None:
    """Point ``bench._prepare``'s building blocks at the case's variants."""
    fast_path.ConvBNAct.forward = folded_forward if "folded" in variants else plain_forward

    def build(*args, **kwargs):
        model = plain_build(*args, **kwargs)
        model.set_grad_checkpointing("ckpt" in variants)
        return model
    bench.build = build
    cudagraphs = "cudagraphs" in variants
    bench.torch.compile = functools.partial(plain_compile, mode="reduce-overhead" if cudagraphs else None)

    def compile_for_inference(model):  # coatnet.compile_for_inference with CUDA graphs
        compiled = plain_compile(model.eval(), mode="reduce-overhead")

        def serve(x):
            with torch._inductor.config.patch(freezing=True):
                return compiled(x)
        return serve
    bench.compile_for_inference = compile_for_inference if cudagraphs else plain_compile_for_inference


def profile(case: str) -> None:
    impl, dtype, mode, compiled, variants = parse(case)
    with_variants(variants)
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in variants
    torch.backends.cudnn.allow_tf32 = "notf32" not in variants
    batch = 64 if compiled and dtype == "float32" else 128
    job = bench.Job(impl, "coatnet_0", mode, compiled, 224, batch, None, "cuda", dtype)
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    run, _ = bench._prepare(job, device)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    warm = time.perf_counter() - started
    times = []
    for _ in range(20):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    calls = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    # Not the ranges that record_function marks on the GPU's timeline too (Inductor's "## Call
    # CompiledFxGraph ... ##", "Optimizer.step#AdamW.step"): they span kernels counted on their own.
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy = max(sum(e.self_device_time_total for e in kernels) / calls / 1e3, 1e-9)  # ms per call
    launches = sum(e.count for e in kernels) / calls
    print(f"\n## {case}: batch {batch}, {batch / wall:,.0f} images/s (median of 20, {min(times) * 1e3:.2f}.."
          f"{max(times) * 1e3:.2f} ms), warm-up {warm:.0f} s, peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    print(f"wall {wall * 1e3:.2f} ms/call; kernels {busy:.2f} ms ({busy / wall / 10:.0f}% busy), {launches:.0f} launches")
    by_kind = defaultdict(float)
    for e in kernels:
        by_kind[kind(e.key)] += e.self_device_time_total / calls / 1e3
    for name, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {name:30s} {ms:7.2f} ms  {ms / busy:4.0%}")
    print("top kernels (ms/call, launches/call, kind, name):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:22]:
        print(f"  {e.self_device_time_total / calls / 1e3:7.3f} {e.count // calls:4d}  {kind(e.key)[:12]:12s} {e.key[:150]}")
    print("top operators by the kernel time they launch themselves (ms/call, calls/call, input shapes):")
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:16]:
        print(f"  {e.self_device_time_total / calls / 1e3:7.3f} {e.count // calls:4d}  {e.key} {str(e.input_shapes)[:120]}")
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+",
                        help="IMPL-DTYPE-MODE[-compiled][-VARIANT...], e.g. coatnet-bfloat16-inference")
    try:  # a misspelt case fails before anything runs
        cases = [(case, parse(case)) for case in parser.parse_args().cases]
    except ValueError as error:
        parser.error(str(error))
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    failed = []
    for case, _ in cases:
        try:
            profile(case)
        except Exception as error:  # one case failing must not lose the others
            print(f"\n## {case}: failed: {type(error).__name__}: {str(error)[:300]}")
            failed.append(case)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
    sys.exit(f"failed: {' '.join(failed)}" if failed else 0)
