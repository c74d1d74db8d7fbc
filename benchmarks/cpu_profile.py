"""Where a CPU's time goes in CoAtNet-0, and the roofline it implies: for each case, images/s (median
of back-to-back calls after warm-up), self time by kind of work (profiled with shapes), how fast the
matrix products run, and the bound: the time a call would take with every product at the matmul's
rate (a square ``torch.mm`` in the same dtype, timed in the same process) and everything else as
measured.

A case is ``IMPL-DTYPE-MODE[-compiled]`` as in gpu_profile.py, e.g. ``coatnet-float32-train``; its
call is built as ``coatnet bench`` builds it (``bench._prepare``: batch 8, 224 px, a training step
with AdamW, bfloat16 as autocast). Matrix products are the convolutions but the depthwise ones, the
linear layers and the batched products; the attention's fused kernel (inference) counts as
attention, not as a product, so the bound is a little strict there. Compiled cases profile
Inductor's generated kernels by name (``torch._inductor.config.cpp.enable_kernel_profile``).

``python benchmarks/cpu_profile.py [--threads N] CASE...``; as ``coatnet train`` runs, with freed
memory kept (coatnet.allocator): ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647
python benchmarks/cpu_profile.py ...``. docs/performance.md has its figures.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from coatnet import bench

PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward", "mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise",
            "mkldnn::_convolution_pointwise_", "aten::_convolution", "aten::linear"}
WEIGHT_ARGUMENT = {"aten::convolution_backward": 2}  # the others take the weight second
KINDS = [  # (kind, test on the operator's name); first match wins
    ("fused by Inductor", lambda n: "cpp_fused" in n),  # its names list the ops fused (norms, softmax)
    ("attention", lambda n: "scaled_dot_product" in n or "softmax" in n),
    ("norms", lambda n: "norm" in n),
    ("activations", lambda n: any(a in n for a in ("gelu", "sigmoid", "silu", "tanh", "relu"))),
    ("optimizer", lambda n: "adam" in n or "foreach" in n),
    ("elementwise, reductions, copies, pools", lambda n: n.startswith("aten::")),
]


def kind(event) -> str:
    name = event.key
    if name in PRODUCTS:
        shapes = event.input_shapes
        weight = shapes[WEIGHT_ARGUMENT.get(name, 1)] if len(shapes) > 2 else []
        depthwise = "conv" in name and len(weight) == 4 and weight[1] == 1 and weight[0] > 1
        return "depthwise convs" if depthwise else "matrix products"
    return next((k for k, test in KINDS if test(name)), "other (dispatch, Python)")


def timed(run, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def matmul_flops(dtype: str) -> float:
    """FLOP/s of a square torch.mm as the bench times it, in the case's dtype."""
    n = 2048
    a, b = (torch.randn(n, n, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32) for _ in range(2))
    timed(lambda: torch.mm(a, b), 5)
    return 2 * n**3 / statistics.median(timed(lambda: torch.mm(a, b), 20))


def parse(case: str, threads: int | None) -> bench.Job:
    parts = case.split("-")
    impl, dtype, mode, *rest = parts if len(parts) >= 3 else ("", "", "")
    if (impl not in ("coatnet", "timm") or dtype not in ("float32", "bfloat16") or mode not in ("inference", "train")
            or rest not in ([], ["compiled"])):
        raise SystemExit(f"unknown case {case!r}: IMPL-DTYPE-MODE[-compiled], IMPL coatnet or timm, DTYPE float32 "
                         f"or bfloat16, MODE inference or train")
    return bench.Job(impl, "coatnet_0", mode, bool(rest), 224, 8, threads, "cpu", dtype)


def profile(case: str, job: bench.Job) -> None:
    # Inductor's kernels by name in the profile (else their time is their graph's, under "other")
    torch._inductor.config.cpp.enable_kernel_profile = job.compiled
    torch.manual_seed(0)
    run, flop_per_image = bench._prepare(job, torch.device("cpu"))
    flop = flop_per_image * job.batch_size
    timed(run, 3)
    peak = matmul_flops(job.dtype)
    times = timed(run, 8)
    peak = statistics.median([peak, matmul_flops(job.dtype)])  # before and after the model's calls
    wall = statistics.median(times)
    calls = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        timed(run, calls)
    by_kind, ops = defaultdict(float), defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / calls / 1e3
        by_kind[kind(event)] += ms
        ops[event.key, str(event.input_shapes)[:100]] += ms
    profiled = sum(by_kind.values())
    products = by_kind["matrix products"] / profiled * wall  # the products' share of the unprofiled call
    bound = flop / (flop / peak + wall - products)  # products at the matmul's rate, the rest as measured
    print(f"\n## {case}: {job.batch_size / wall:.2f} images/s, {wall * 1e3:.0f} ms a call (median of {len(times)}, "
          f"{min(times) * 1e3:.0f}..{max(times) * 1e3:.0f}); {flop / 1e9:.1f} GFLOP a call, {flop / wall / 1e9:.1f} "
          f"GFLOP/s: {flop / wall / peak:.0%} of the matmul ({peak / 1e9:.1f} GFLOP/s, {job.dtype})")
    print(f"self time by kind, ms a call ({calls} calls profiled, {profiled:.0f} ms a call with the profiler on):")
    for name, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {name:40s} {ms:7.1f}  {ms / profiled:4.0%}")
    print(f"matrix products: {flop / products / 1e9:.0f} GFLOP/s ({flop / products / peak:.0%} of the matmul, "
          f"all of the call's FLOPs counted as theirs)")
    print(f"roofline: every product at the matmul's rate, the rest as measured: {flop / bound * 1e3:.0f} ms a call, "
          f"{bound / peak:.0%} of the matmul (measured {flop / wall / peak:.0%})")
    print("top operators (ms a call, input shapes):")
    for (name, shapes), ms in sorted(ops.items(), key=lambda item: -item[1])[:20]:
        print(f"  {ms:7.1f}  {name} {shapes}")
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    jobs = [parse(case, args.threads) for case in args.cases]  # a misspelt case fails before anything runs
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    failed = []
    for case, job in zip(args.cases, jobs):
        try:
            profile(case, job)
        except Exception as error:  # one case failing must not lose the others
            print(f"\n## {case}: failed: {type(error).__name__}: {str(error)[:300]}")
            failed.append(case)
        torch._dynamo.reset()
    sys.exit(f"failed: {' '.join(failed)}" if failed else 0)
